//! The user an image's `USER` names, resolved in the image's own
//! `/etc/passwd` and `/etc/group`, as container runtimes do (containerd's
//! `WithUser` for upstream). A name that cannot be resolved fails the
//! deploy: running it as root instead would be the silent privilege gain
//! docs/security.md rules out.
//!
//! The files are read from the layer directories of the container's
//! snapshot (the overlay mount's upper and lower directories, top first)
//! without mounting anything. Each read resolves paths inside that layer
//! only (`openat2` with `RESOLVE_IN_ROOT`), so a symlink in an image can
//! never make the daemon read a file of the host.

use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use containerd_client::types::Mount;
use rustix::fs::{FileType, Mode, OFlags, ResolveFlags};

/// Larger account files are not what an image means to ship.
const MAX_ACCOUNT_FILE: u64 = 4 << 20;

/// The process identity of the OCI spec's `process.user`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessUser {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserError {
    #[error("the image's user {user:?} is not in its /etc/passwd")]
    NoSuchUser { user: String },
    #[error("the image's group {group:?} is not in its /etc/group")]
    NoSuchGroup { group: String },
    #[error("the image's USER {0:?} is not a valid user[:group]")]
    Invalid(String),
    #[error("reading the image's {file}: {reason}")]
    Read { file: &'static str, reason: String },
}

/// One `/etc/passwd` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Passwd {
    name: String,
    uid: u32,
    gid: u32,
}

/// One `/etc/group` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Group {
    name: String,
    gid: u32,
    members: Vec<String>,
}

fn parse_passwd(text: &str) -> Vec<Passwd> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            Some(Passwd {
                name: f.first()?.to_string(),
                uid: f.get(2)?.parse().ok()?,
                gid: f.get(3)?.parse().ok()?,
            })
        })
        .collect()
}

fn parse_group(text: &str) -> Vec<Group> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            Some(Group {
                name: f.first()?.to_string(),
                gid: f.get(2)?.parse().ok()?,
                members: f
                    .get(3)
                    .map(|m| {
                        m.split(',')
                            .filter(|s| !s.is_empty())
                            .map(str::to_string)
                            .collect()
                    })
                    .unwrap_or_default(),
            })
        })
        .collect()
}

/// Resolves `USER` (`user`, `uid`, `user:group`, `uid:gid`, ...) against
/// the image's account files (`None`: the image has no such file). As
/// docker: a numeric uid without an entry runs with gid 0; the user's
/// supplementary groups come from `/etc/group`.
pub fn resolve(
    user: &str,
    passwd: Option<&str>,
    group: Option<&str>,
) -> Result<ProcessUser, UserError> {
    let user = user.trim();
    let users = passwd.map(parse_passwd).unwrap_or_default();
    let groups = group.map(parse_group).unwrap_or_default();
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (if user.is_empty() { "0" } else { user }, None),
    };
    if u.is_empty() || g == Some("") {
        return Err(UserError::Invalid(user.to_string()));
    }
    let entry = match u.parse::<u32>() {
        Ok(uid) => users
            .iter()
            .find(|p| p.uid == uid)
            .cloned()
            .or(Some(Passwd {
                name: String::new(),
                uid,
                gid: 0,
            })),
        Err(_) => users.iter().find(|p| p.name == u).cloned(),
    }
    .ok_or_else(|| UserError::NoSuchUser {
        user: u.to_string(),
    })?;
    let gid = match g {
        None => entry.gid,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => groups
                .iter()
                .find(|x| x.name == g)
                .map(|x| x.gid)
                .ok_or_else(|| UserError::NoSuchGroup {
                    group: g.to_string(),
                })?,
        },
    };
    let mut additional_gids: Vec<u32> = groups
        .iter()
        .filter(|x| !entry.name.is_empty() && x.members.contains(&entry.name))
        .map(|x| x.gid)
        .filter(|x| *x != gid)
        .collect();
    additional_gids.sort_unstable();
    additional_gids.dedup();
    Ok(ProcessUser {
        uid: entry.uid,
        gid,
        additional_gids,
    })
}

/// The layer directories of a snapshot's mounts, topmost first.
pub fn layer_dirs(mounts: &[Mount]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for m in mounts {
        if m.r#type == "overlay" {
            let opt = |key: &str| {
                m.options
                    .iter()
                    .find_map(|o| o.strip_prefix(key).map(str::to_string))
            };
            if let Some(upper) = opt("upperdir=") {
                out.push(PathBuf::from(upper));
            }
            if let Some(lower) = opt("lowerdir=") {
                out.extend(lower.split(':').map(PathBuf::from));
            }
        } else if m.r#type == "bind" || m.options.iter().any(|o| o == "bind" || o == "rbind") {
            out.push(PathBuf::from(&m.source));
        }
    }
    out
}

/// What a layer says about a file.
enum InLayer {
    File(String),
    /// Deleted by this layer (an overlay whiteout): lower layers do not count.
    Whiteout,
    Absent,
}

/// Opens `rel` inside `layer` as if `layer` were `/`.
fn open_in_layer(layer: &OwnedFd, rel: &str, flags: OFlags) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat2(
        layer,
        rel,
        flags | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS | ResolveFlags::NO_XDEV,
    )
}

fn read_in_layer(layer: &Path, rel: &str) -> Result<InLayer, String> {
    let root = match rustix::fs::open(
        layer,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(e) => return Err(format!("layer {}: {e}", layer.display())),
    };
    let path_fd = match open_in_layer(&root, rel, OFlags::PATH) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT) | Err(rustix::io::Errno::NOTDIR) => {
            return Ok(InLayer::Absent);
        }
        Err(e) => return Err(e.to_string()),
    };
    let st = rustix::fs::fstat(&path_fd).map_err(|e| e.to_string())?;
    match FileType::from_raw_mode(st.st_mode) {
        FileType::CharacterDevice if st.st_rdev == 0 => return Ok(InLayer::Whiteout),
        FileType::RegularFile => {}
        _ => return Err("not a regular file".into()),
    }
    if st.st_size as u64 > MAX_ACCOUNT_FILE {
        return Err(format!("larger than {MAX_ACCOUNT_FILE} bytes"));
    }
    let fd = open_in_layer(
        &root,
        rel,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NOCTTY,
    )
    .or_else(|_| open_in_layer(&root, rel, OFlags::RDONLY | OFlags::NOCTTY))
    .map_err(|e| e.to_string())?;
    let mut text = String::new();
    std::fs::File::from(fd)
        .take(MAX_ACCOUNT_FILE)
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    Ok(InLayer::File(text))
}

/// An account file of the image (`etc/passwd`, `etc/group`): the topmost
/// layer that has it or deletes it decides.
fn account_file(layers: &[PathBuf], file: &'static str) -> Result<Option<String>, UserError> {
    for layer in layers {
        match read_in_layer(layer, file) {
            Ok(InLayer::File(text)) => return Ok(Some(text)),
            Ok(InLayer::Whiteout) => return Ok(None),
            Ok(InLayer::Absent) => continue,
            Err(reason) => return Err(UserError::Read { file, reason }),
        }
    }
    Ok(None)
}

/// Resolves the image's `USER` in the snapshot behind `mounts`.
pub fn resolve_in_rootfs(user: &str, mounts: &[Mount]) -> Result<ProcessUser, UserError> {
    let layers = layer_dirs(mounts);
    let passwd = account_file(&layers, "etc/passwd")?;
    let group = account_file(&layers, "etc/group")?;
    resolve(user, passwd.as_deref(), group.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        # a comment\n\
        nobody:x:65534:65534:nobody:/:/bin/false\n\
        app:x:1000:1001::/home/app:/bin/sh\n";
    const GROUP: &str =
        "root:x:0:\nnogroup:x:65534:\napp:x:1001:\nvideo:x:44:app,other\naudio:x:29:app\n";

    fn r(user: &str) -> Result<ProcessUser, UserError> {
        resolve(user, Some(PASSWD), Some(GROUP))
    }

    #[test]
    fn users_as_docker_resolves_them() {
        assert_eq!(r("").expect("root"), ProcessUser::default());
        assert_eq!(
            r("nobody").expect("nobody"),
            ProcessUser {
                uid: 65534,
                gid: 65534,
                additional_gids: vec![]
            }
        );
        assert_eq!(
            r("app").expect("app"),
            ProcessUser {
                uid: 1000,
                gid: 1001,
                additional_gids: vec![29, 44]
            }
        );
        assert_eq!(r("1000").expect("uid").gid, 1001);
        // A uid without an entry: gid 0, as docker.
        assert_eq!(r("4242").expect("uid").gid, 0);
        assert_eq!(r("app:audio").expect("group").gid, 29);
        assert_eq!(r("app:7").expect("gid").gid, 7);
        assert_eq!(
            r("5:6").expect("ids"),
            ProcessUser {
                uid: 5,
                gid: 6,
                additional_gids: vec![]
            }
        );
        assert!(matches!(r("ghost"), Err(UserError::NoSuchUser { .. })));
        assert!(matches!(
            r("app:ghosts"),
            Err(UserError::NoSuchGroup { .. })
        ));
        assert!(matches!(r("app:"), Err(UserError::Invalid(_))));
        // No /etc/passwd at all: names cannot be resolved, numbers can.
        assert!(resolve("nobody", None, None).is_err());
        assert_eq!(resolve("7", None, None).expect("uid").uid, 7);
    }

    fn overlay(upper: &Path, lower: &[&Path]) -> Vec<Mount> {
        let lower: Vec<String> = lower.iter().map(|p| p.display().to_string()).collect();
        vec![Mount {
            r#type: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options: vec![
                format!("upperdir={}", upper.display()),
                format!("lowerdir={}", lower.join(":")),
                "workdir=/w".into(),
            ],
        }]
    }

    #[test]
    fn account_files_come_from_the_topmost_layer_and_never_from_the_host() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (upper, top, base) = (
            dir.path().join("u"),
            dir.path().join("l1"),
            dir.path().join("l0"),
        );
        for d in [&upper, &top, &base] {
            std::fs::create_dir_all(d.join("etc")).expect("mkdir");
        }
        std::fs::write(base.join("etc/passwd"), "svc:x:10:10::/:/bin/sh\n").expect("w");
        std::fs::write(top.join("etc/passwd"), PASSWD).expect("w");
        std::fs::write(base.join("etc/group"), GROUP).expect("w");
        let mounts = overlay(&upper, &[&top, &base]);
        assert_eq!(
            resolve_in_rootfs("nobody", &mounts).expect("top").uid,
            65534
        );
        assert!(
            resolve_in_rootfs("svc", &mounts).is_err(),
            "the lower passwd is hidden"
        );
        assert_eq!(
            resolve_in_rootfs("app", &mounts)
                .expect("groups from the base")
                .additional_gids,
            [29, 44]
        );

        // Symlinks to the host's files resolve inside the layer, where the
        // targets do not exist: the lower layer's files count, never the host's.
        let evil = dir.path().join("evil");
        std::fs::create_dir_all(evil.join("etc")).expect("mkdir");
        std::os::unix::fs::symlink("/etc/hostname", evil.join("etc/passwd")).expect("symlink");
        std::os::unix::fs::symlink("../../../../../etc/shadow", evil.join("etc/group"))
            .expect("symlink");
        let mounts = overlay(&upper, &[&evil, &base]);
        assert_eq!(resolve_in_rootfs("svc", &mounts).expect("base").uid, 10);
        assert!(
            resolve_in_rootfs("root", &mounts).is_err(),
            "host root must not resolve"
        );
    }

    #[test]
    fn bind_mounts_are_one_layer() {
        let m = Mount {
            r#type: "bind".into(),
            source: "/snap/1/fs".into(),
            target: String::new(),
            options: vec!["rbind".into(), "ro".into()],
        };
        assert_eq!(layer_dirs(&[m]), [PathBuf::from("/snap/1/fs")]);
    }
}
