//! Bench-only: the floor of the per-packet cost measurements -- a TC
//! program that does nothing (`return TCX_NEXT`), or an XDP one
//! (`return XDP_PASS`), on the same hook as the program it is compared with, so both are measured in one run under the
//! same conditions (BPF statistics on, same traffic, same CPU load).
//!
//! Two instructions, loaded through the bpf(2) syscall directly: no object
//! file to build or ship, and nothing of it in the product's eBPF object.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{Context, Result, bail};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_TCX_INGRESS: u32 = 46;
/// tcx: insert before `relative_fd`, or first of all when it is 0.
const BPF_F_BEFORE: u32 = 1 << 3;

/// `r0 = -1` (TCX_NEXT / TC_ACT_UNSPEC: the next program decides); `exit`.
const NOOP: [u64; 2] = [0xb7 | (0xffff_ffffu64 << 32), 0x95];
/// `r0 = 2` (XDP_PASS); `exit`.
const NOOP_XDP: [u64; 2] = [0xb7 | (2u64 << 32), 0x95];

/// Which hook the do-nothing program is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Tc,
    Xdp,
}

/// The loaded do-nothing program.
pub struct Floor {
    fd: OwnedFd,
}

/// The bpf_attr union, large enough for every command used here.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Attr([0; 128])
    }
    fn put32(&mut self, off: usize, v: u32) {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
    }
    fn put64(&mut self, off: usize, v: u64) {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
    }
    fn get32(&self, off: usize) -> u32 {
        u32::from_ne_bytes(self.0[off..off + 4].try_into().expect("4 bytes"))
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<i64> {
    // SAFETY: `attr` is a zero-padded bpf_attr of the size passed.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut Attr, 128usize) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

impl Floor {
    /// Loads the TC program (root).
    pub fn load() -> Result<Floor> {
        Floor::load_for(Hook::Tc)
    }

    /// Loads the program for `hook` (root).
    pub fn load_for(hook: Hook) -> Result<Floor> {
        let license = CString::new("GPL").expect("no NUL");
        let (prog_type, insns) = match hook {
            Hook::Tc => (BPF_PROG_TYPE_SCHED_CLS, &NOOP),
            Hook::Xdp => (BPF_PROG_TYPE_XDP, &NOOP_XDP),
        };
        let mut a = Attr::new();
        a.put32(0, prog_type);
        a.put32(4, insns.len() as u32);
        a.put64(8, insns.as_ptr() as u64);
        a.put64(16, license.as_ptr() as u64);
        // prog_name at 48.
        a.0[48..58].copy_from_slice(b"oak_floor\0");
        let fd = bpf(BPF_PROG_LOAD, &mut a).context("loading the floor program")?;
        // SAFETY: a new descriptor the kernel just returned to us.
        Ok(Floor {
            fd: unsafe { OwnedFd::from_raw_fd(fd as i32) },
        })
    }

    /// The program's kernel id (for `bpftool prog show id`).
    pub fn id(&self) -> Result<u32> {
        let mut info = [0u8; 256];
        let mut a = Attr::new();
        a.put32(0, self.fd.as_raw_fd() as u32);
        a.put32(4, info.len() as u32);
        a.put64(8, info.as_mut_ptr() as u64);
        bpf(BPF_OBJ_GET_INFO_BY_FD, &mut a).context("reading the floor program's id")?;
        Ok(u32::from_ne_bytes(info[4..8].try_into().expect("4 bytes")))
    }

    /// Attaches it first on `ifindex`'s TC ingress (tcx, Linux 6.6) and pins
    /// the link at `pin`: it stays attached until the pin is removed or the
    /// interface goes.
    pub fn attach_ingress_first(&self, ifindex: u32, pin: &str) -> Result<()> {
        let mut a = Attr::new();
        a.put32(0, self.fd.as_raw_fd() as u32);
        a.put32(4, ifindex);
        a.put32(8, BPF_TCX_INGRESS);
        a.put32(12, BPF_F_BEFORE);
        let link = bpf(BPF_LINK_CREATE, &mut a).context("attaching the floor program (tcx)")?;
        // SAFETY: a new descriptor the kernel just returned to us.
        let link = unsafe { OwnedFd::from_raw_fd(link as i32) };
        pin_fd(link.as_raw_fd(), pin).with_context(|| format!("pinning the floor link at {pin}"))
    }

    /// Pins the program itself at `pin` (for `ip link set dev IF xdpgeneric
    /// pinned PIN`): it stays loaded until the pin is removed.
    pub fn pin_program(&self, pin: &str) -> Result<()> {
        pin_fd(self.fd.as_raw_fd(), pin)
            .with_context(|| format!("pinning the floor program at {pin}"))
    }

    /// One BPF_PROG_TEST_RUN of `frame`: the kernel's time for it, in ns.
    pub fn test_run_ns(&self, frame: &[u8]) -> Result<u64> {
        let mut out = vec![0u8; frame.len() + 256];
        let mut a = Attr::new();
        a.put32(0, self.fd.as_raw_fd() as u32);
        a.put32(8, frame.len() as u32);
        a.put32(12, out.len() as u32);
        a.put64(16, frame.as_ptr() as u64);
        a.put64(24, out.as_mut_ptr() as u64);
        a.put32(32, 1);
        bpf(BPF_PROG_TEST_RUN, &mut a).context("test-running the floor program")?;
        if a.get32(4) != u32::MAX {
            bail!("the floor program returned {}", a.get32(4));
        }
        Ok(a.get32(36) as u64)
    }
}

/// BPF_OBJ_PIN of `fd` at `pin`.
fn pin_fd(fd: i32, pin: &str) -> Result<()> {
    let path = CString::new(pin).context("pin path")?;
    let mut a = Attr::new();
    a.put64(0, path.as_ptr() as u64);
    a.put32(8, fd as u32);
    bpf(BPF_OBJ_PIN, &mut a)?;
    Ok(())
}
