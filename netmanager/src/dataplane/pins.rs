//! Pinned maps outlive NetManager, so the next one -- possibly another
//! version -- finds them. aya adopts a pin as it is; the programs would then
//! run on a map whose type, key, value or size is not the one they were
//! built for (garbage at best). So before loading, every pin is compared
//! with what this build declares, and
//!
//! - adopted when it matches;
//! - migrated when key and value sizes match but the type, flags or size
//!   differ (an upgrade that made the flow tables non-evicting, a new table
//!   size from netcfg.json, a longer counter list): a fresh map is created
//!   and the old entries are copied in, so established flows keep their
//!   backend. Only a flow opened in the milliseconds between the copy and
//!   the program swap is lost (its next packet picks a backend again);
//! - migrated too when a map whose value only ever grows by appended fields
//!   ([`widened`]: FLOWS) has the value of an earlier version: each old
//!   value is copied with the new fields zero, which that map's programs
//!   read as "not filled in yet";
//! - recreated empty when NetManager rebuilds the contents anyway
//!   (configuration, pending marks, the miss ring, derived indexes);
//! - refused otherwise: a table whose entries have another layout was made
//!   by another version (or another program), and guessing would hand
//!   established connections garbage. The error names the map, what
//!   differs and the remedy.

use std::collections::BTreeMap;
use std::io;
use std::mem;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};

use aya::maps::{MapData, MapInfo};
use aya_obj::generated::{bpf_attr, bpf_cmd, bpf_map_type};
use netmanager_common::maps;

use super::{DataplaneError, Result};

/// What a map looks like to the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl Layout {
    fn of_pin(info: &MapInfo) -> Result<Layout> {
        let map_type = info
            .map_type()
            .map_err(|e| DataplaneError::bpf("reading a pinned map's type", e))?;
        Ok(Layout {
            map_type: map_type as u32,
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            flags: info.map_flags(),
        })
    }

    /// What differs from `want`, for messages.
    fn differences(&self, want: &Layout) -> String {
        let mut d = Vec::new();
        let mut diff = |what: &str, have: String, want: String| {
            if have != want {
                d.push(format!("{what} {have} (this NetManager: {want})"));
            }
        };
        diff("type", type_name(self.map_type), type_name(want.map_type));
        diff(
            "key size",
            self.key_size.to_string(),
            want.key_size.to_string(),
        );
        diff(
            "value size",
            self.value_size.to_string(),
            want.value_size.to_string(),
        );
        diff(
            "max entries",
            self.max_entries.to_string(),
            want.max_entries.to_string(),
        );
        diff(
            "flags",
            format!("{:#x}", self.flags),
            format!("{:#x}", want.flags),
        );
        d.join(", ")
    }
}

fn type_name(t: u32) -> String {
    const NAMES: [(bpf_map_type, &str); 9] = [
        (bpf_map_type::BPF_MAP_TYPE_HASH, "hash"),
        (bpf_map_type::BPF_MAP_TYPE_ARRAY, "array"),
        (bpf_map_type::BPF_MAP_TYPE_PERCPU_HASH, "per-CPU hash"),
        (bpf_map_type::BPF_MAP_TYPE_PERCPU_ARRAY, "per-CPU array"),
        (bpf_map_type::BPF_MAP_TYPE_LRU_HASH, "LRU hash"),
        (
            bpf_map_type::BPF_MAP_TYPE_LRU_PERCPU_HASH,
            "LRU per-CPU hash",
        ),
        (bpf_map_type::BPF_MAP_TYPE_LPM_TRIE, "LPM trie"),
        (bpf_map_type::BPF_MAP_TYPE_RINGBUF, "ring buffer"),
        (bpf_map_type::BPF_MAP_TYPE_PROG_ARRAY, "program array"),
    ];
    NAMES
        .iter()
        .find(|(k, _)| *k as u32 == t)
        .map(|(_, n)| n.to_string())
        .unwrap_or_else(|| format!("type {t}"))
}

/// Whether NetManager rewrites a map's contents at every start (or they
/// are transient), so an old pin of it can simply be replaced.
fn rebuilt(name: &str) -> bool {
    [
        maps::CONFIG,
        maps::PENDING,
        maps::MISSES,
        maps::SCRATCH,
        maps::INSTANCE_NODES,
        maps::TRUSTED_PEERS,
        maps::FLOW_COUNTS,
        maps::ROUTE_CACHE,
        maps::ROUTE_EPOCH,
    ]
    .contains(&name)
}

/// What to do with one pinned map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nothing pinned: the loader creates and pins it.
    Create,
    Adopt,
    /// Copy the old entries into a fresh map.
    Migrate {
        differs: String,
    },
    /// Replace with a fresh, empty map.
    Recreate {
        differs: String,
    },
}

/// Decides for each expected map; fails, changing nothing, when one pin
/// cannot be used.
pub fn decide(
    pin_dir: &Path,
    expected: &BTreeMap<String, Layout>,
) -> Result<Vec<(String, Decision)>> {
    let mut out = Vec::new();
    let mut refused = Vec::new();
    for (name, want) in expected {
        let path = pin_dir.join(name);
        if !path.exists() {
            out.push((name.clone(), Decision::Create));
            continue;
        }
        let info = MapInfo::from_pin(&path).map_err(|e| {
            DataplaneError::bpf(
                format!(
                    "{} is pinned but is no map this NetManager can open",
                    path.display()
                ),
                e,
            )
        })?;
        let have = Layout::of_pin(&info)?;
        let decision = if have == *want {
            Decision::Adopt
        } else if rebuilt(name) {
            Decision::Recreate {
                differs: have.differences(want),
            }
        } else if have.key_size == want.key_size
            && (have.value_size == want.value_size
                || widened(name, have.value_size, want.value_size))
            && copyable(have.map_type)
            && copyable(want.map_type)
        {
            Decision::Migrate {
                differs: have.differences(want),
            }
        } else {
            refused.push(format!("{name}: {}", have.differences(want)));
            continue;
        };
        out.push((name.clone(), decision));
    }
    if !refused.is_empty() {
        return Err(DataplaneError::Other(format!(
            "the maps pinned in {dir} were made by another NetManager version or another program, \
             and their entries do not fit this one's: {list}. Stop whatever uses them and remove \
             those pins (`rm {dir}/<map>`; established overlay connections through this node then \
             pick their backends again), or run the NetManager that made them",
            dir = pin_dir.display(),
            list = refused.join("; ")
        )));
    }
    Ok(out)
}

/// Whether map `name`'s values grew from `have` to `want` bytes by fields
/// appended at the end, which the programs take as absent when zero: only
/// the earlier sizes of such maps are listed (any other size is some other
/// layout), and no per-CPU map (their values are copied as they are).
/// FLOWS: 40 bytes before the `INSTANCES` copies of `Flow`, whose epoch 0
/// is never current.
fn widened(name: &str, have: u32, want: u32) -> bool {
    const EARLIER: [(&str, &[u32]); 1] = [(maps::FLOWS, &[40])];
    have < want
        && EARLIER
            .iter()
            .any(|(map, sizes)| *map == name && sizes.contains(&have))
}

/// Map types whose entries can be listed and written from userspace.
fn copyable(t: u32) -> bool {
    [
        bpf_map_type::BPF_MAP_TYPE_HASH,
        bpf_map_type::BPF_MAP_TYPE_ARRAY,
        bpf_map_type::BPF_MAP_TYPE_PERCPU_HASH,
        bpf_map_type::BPF_MAP_TYPE_PERCPU_ARRAY,
        bpf_map_type::BPF_MAP_TYPE_LRU_HASH,
        bpf_map_type::BPF_MAP_TYPE_LRU_PERCPU_HASH,
        bpf_map_type::BPF_MAP_TYPE_LPM_TRIE,
    ]
    .iter()
    .any(|k| *k as u32 == t)
}

/// Where a replaced pin waits while its successor is loaded (bpffs allows
/// no dots in names; a dash is in no map name).
fn aside(pin_dir: &Path, name: &str) -> PathBuf {
    pin_dir.join(format!("{name}-replaced"))
}

/// Moves the pins to be replaced out of the way, so the loader creates
/// fresh maps in their place. A `-replaced` pin left by a NetManager that
/// died half-way is dropped first.
pub fn set_aside(pin_dir: &Path, decisions: &[(String, Decision)]) -> Result<()> {
    for (name, d) in decisions {
        if matches!(d, Decision::Migrate { .. } | Decision::Recreate { .. }) {
            let from = pin_dir.join(name);
            let to = aside(pin_dir, name);
            remove_if_there(&to)?;
            std::fs::rename(&from, &to)
                .map_err(|e| DataplaneError::bpf(format!("moving {} aside", from.display()), e))?;
        }
    }
    Ok(())
}

/// After loading: copies the entries of migrated maps into their new pins
/// and drops every set-aside pin (the old programs keep their maps until
/// their links take the new programs).
pub fn finish(pin_dir: &Path, decisions: &[(String, Decision)]) -> Result<()> {
    for (name, d) in decisions {
        let old = aside(pin_dir, name);
        match d {
            Decision::Migrate { differs } => {
                let (copied, dropped) = copy_entries(&old, &pin_dir.join(name))?;
                if dropped > 0 {
                    tracing::warn!(
                        map = %name,
                        copied,
                        dropped,
                        "pinned map migrated ({differs}); the new one is smaller: entries that did not fit are gone"
                    );
                } else {
                    tracing::info!(map = %name, copied, "pinned map migrated ({differs}); its entries were kept");
                }
            }
            Decision::Recreate { differs } => {
                tracing::info!(map = %name, "pinned map recreated ({differs}); NetManager rewrites its contents");
            }
            Decision::Create | Decision::Adopt => continue,
        }
        remove_if_there(&old)?;
    }
    Ok(())
}

/// Undoes [`set_aside`] after a failed load.
pub fn restore(pin_dir: &Path, decisions: &[(String, Decision)]) {
    for (name, d) in decisions {
        if matches!(d, Decision::Migrate { .. } | Decision::Recreate { .. }) {
            let pin = pin_dir.join(name);
            let _ = std::fs::remove_file(&pin);
            if let Err(e) = std::fs::rename(aside(pin_dir, name), &pin) {
                tracing::warn!("putting back {}: {e}", pin.display());
            }
        }
    }
}

fn remove_if_there(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(DataplaneError::bpf(
            format!("removing {}", path.display()),
            e,
        )),
    }
}

/// Copies every entry of the map pinned at `from` into the one at `to`
/// (same key size; the same value size, or a longer one that each value is
/// padded to with zeros, see [`widened`]); returns (copied, did not fit).
fn copy_entries(from: &Path, to: &Path) -> Result<(usize, usize)> {
    let open = |p: &Path| {
        MapData::from_pin(p).map_err(|e| DataplaneError::bpf(format!("opening {}", p.display()), e))
    };
    let (src, dst) = (open(from)?, open(to)?);
    let info = src
        .info()
        .map_err(|e| DataplaneError::bpf(format!("reading {}", from.display()), e))?;
    let per_cpu = [
        bpf_map_type::BPF_MAP_TYPE_PERCPU_HASH,
        bpf_map_type::BPF_MAP_TYPE_PERCPU_ARRAY,
        bpf_map_type::BPF_MAP_TYPE_LRU_PERCPU_HASH,
    ]
    .iter()
    .any(|t| info.map_type().is_ok_and(|m| m as u32 == *t as u32));
    let value_len = if per_cpu {
        let cpus = aya::util::nr_cpus()
            .map_err(|(what, e)| DataplaneError::bpf(format!("reading {what}"), e))?;
        (info.value_size() as usize).div_ceil(8) * 8 * cpus
    } else {
        info.value_size() as usize
    };
    let dst_value_len = if per_cpu {
        value_len
    } else {
        let to_info = dst
            .info()
            .map_err(|e| DataplaneError::bpf(format!("reading {}", to.display()), e))?;
        (to_info.value_size() as usize).max(value_len)
    };
    let (src_fd, dst_fd) = (src.fd().as_fd(), dst.fd().as_fd());
    let mut key = vec![0u8; info.key_size() as usize];
    let mut next = key.clone();
    // The old value at the front, zeros after it.
    let mut buf = vec![0u8; dst_value_len];
    let (mut copied, mut dropped) = (0, 0);
    let mut first = true;
    loop {
        let prev = if first { None } else { Some(&key[..]) };
        match raw::next_key(src_fd, prev, &mut next) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                return Err(DataplaneError::bpf(
                    format!("listing {}", from.display()),
                    e,
                ));
            }
        }
        first = false;
        key.copy_from_slice(&next);
        match raw::lookup(src_fd, &key, &mut buf[..value_len]) {
            Ok(true) => {}
            // Deleted under us (the old programs still run): nothing to copy.
            Ok(false) => continue,
            Err(e) => {
                return Err(DataplaneError::bpf(
                    format!("reading {}", from.display()),
                    e,
                ));
            }
        }
        match raw::update(dst_fd, &key, &buf) {
            Ok(()) => copied += 1,
            // Full (a smaller table) or an index beyond a shorter array.
            Err(e) if matches!(e.raw_os_error(), Some(libc::E2BIG) | Some(libc::ENOSPC)) => {
                dropped += 1
            }
            Err(e) => return Err(DataplaneError::bpf(format!("writing {}", to.display()), e)),
        }
    }
    Ok((copied, dropped))
}

/// The three map commands aya offers only for typed maps, on raw bytes.
mod raw {
    use super::*;

    fn bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<()> {
        // SAFETY: attr is a valid, initialised bpf_attr of the size we pass;
        // the buffers it points to outlive the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd as libc::c_long,
                attr as *mut bpf_attr,
                mem::size_of::<bpf_attr>(),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn attr(fd: BorrowedFd<'_>, key: *const u8) -> bpf_attr {
        // SAFETY: an all-zero bpf_attr is valid; we fill the map member.
        let mut a = unsafe { mem::zeroed::<bpf_attr>() };
        // Writing union fields is safe; the kernel reads the map member.
        a.__bindgen_anon_2.map_fd = fd.as_raw_fd() as u32;
        a.__bindgen_anon_2.key = key as u64;
        a
    }

    /// The key after `key` (the first with None) into `next`; false at the end.
    pub fn next_key(fd: BorrowedFd<'_>, key: Option<&[u8]>, next: &mut [u8]) -> io::Result<bool> {
        let mut a = attr(fd, key.map_or(std::ptr::null(), |k| k.as_ptr()));
        a.__bindgen_anon_2.__bindgen_anon_1.next_key = next.as_mut_ptr() as u64;
        match bpf(bpf_cmd::BPF_MAP_GET_NEXT_KEY, &mut a) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The value of `key` into `value`; false when there is none.
    pub fn lookup(fd: BorrowedFd<'_>, key: &[u8], value: &mut [u8]) -> io::Result<bool> {
        let mut a = attr(fd, key.as_ptr());
        a.__bindgen_anon_2.__bindgen_anon_1.value = value.as_mut_ptr() as u64;
        match bpf(bpf_cmd::BPF_MAP_LOOKUP_ELEM, &mut a) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub fn update(fd: BorrowedFd<'_>, key: &[u8], value: &[u8]) -> io::Result<()> {
        let mut a = attr(fd, key.as_ptr());
        // flags 0: BPF_ANY.
        a.__bindgen_anon_2.__bindgen_anon_1.value = value.as_ptr() as u64;
        bpf(bpf_cmd::BPF_MAP_UPDATE_ELEM, &mut a)
    }
}
