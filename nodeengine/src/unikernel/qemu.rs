//! The qemu command line for one unikernel instance, as upstream builds it.

use std::ffi::OsString;
use std::path::PathBuf;

use super::accel::Accel;
use super::guest_net::{Backend, GuestNet};

/// File descriptor number a macvtap device is handed to qemu on.
pub const MACVTAP_FD: i32 = 3;

pub fn binary() -> &'static str {
    match std::env::consts::ARCH {
        "aarch64" => "qemu-system-aarch64",
        _ => "qemu-system-x86_64",
    }
}

/// The machine type (upstream adds `-machine virt` off x86).
pub fn machine() -> &'static str {
    match std::env::consts::ARCH {
        "aarch64" => "virt",
        _ => "pc",
    }
}

/// Everything the command line depends on.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// The task id (`-name`).
    pub name: String,
    pub kernel: PathBuf,
    /// `initramfs.cpio` of the archive.
    pub initrd: Option<PathBuf>,
    /// The archive's `files/` (or `files1/`), shared over 9p as fs0 and fs1.
    pub files: Option<PathBuf>,
    pub memory_mib: u64,
    pub vcpus: f64,
    pub net: Option<GuestNet>,
    /// The job's `cmd`: the application's arguments after `--`.
    pub cmd: Vec<String>,
    pub qmp_socket: PathBuf,
    pub accel: Accel,
}

/// Default guest memory when the job asks for none.
const DEFAULT_MEMORY_MIB: u64 = 64;

impl VmConfig {
    /// The kernel command line: the network as upstream passes it, then `--`
    /// and the application's arguments. None when there is neither.
    pub fn append(&self) -> Option<String> {
        let mut s = self
            .net
            .as_ref()
            .map(GuestNet::kernel_args)
            .unwrap_or_default();
        if self.net.is_some() || !self.cmd.is_empty() {
            if !s.is_empty() {
                s.push(' ');
            }
            s.push_str("--");
            for a in &self.cmd {
                s.push(' ');
                s.push_str(a);
            }
        }
        (!s.is_empty()).then_some(s)
    }

    /// qemu's arguments (the program is [`binary`]).
    pub fn args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |s: &str| a.push(s.into());
        push("-name");
        push(&format!("{},debug-threads=on", self.name));
        for x in self.accel.args() {
            push(x);
        }
        push("-machine");
        push(machine());
        push("-nographic");
        push("-nodefaults");
        push("-no-user-config");
        // A guest that reboots or crashes ends the instance (reported DEAD)
        // instead of looping.
        push("-no-reboot");
        push("-serial");
        push("stdio");
        let memory = if self.memory_mib == 0 {
            DEFAULT_MEMORY_MIB
        } else {
            self.memory_mib
        };
        push("-m");
        push(&memory.to_string());
        push("-smp");
        push(&((self.vcpus.ceil() as u64).max(1)).to_string());
        if let Some(net) = &self.net {
            let netdev = match &net.backend {
                Backend::Tap(ifname) => {
                    format!("tap,id=tap0,ifname={ifname},script=no,downscript=no")
                }
                Backend::Macvtap { .. } => format!("tap,id=tap0,fd={MACVTAP_FD}"),
            };
            push("-netdev");
            push(&netdev);
            push("-device");
            push(&format!(
                "virtio-net-pci,id=nic1,addr=0x0a,netdev=tap0,mac={}",
                net.mac
            ));
        }
        if let Some(files) = &self.files {
            // Upstream shares the folder twice (fs0 and fs1). mapped-xattr keeps
            // what the guest sets (owners, setuid bits) out of the host's view
            // of the files.
            for (id, tag) in [("hvirtio0", "fs0"), ("hvirtio1", "fs1")] {
                push("-fsdev");
                push(&format!(
                    "local,security_model=mapped-xattr,id={id},path={}",
                    files.display()
                ));
                push("-device");
                push(&format!("virtio-9p-pci,fsdev={id},mount_tag={tag}"));
            }
        }
        push("-qmp");
        push(&format!(
            "unix:{},server=on,wait=off",
            self.qmp_socket.display()
        ));
        a.push("-kernel".into());
        a.push(self.kernel.clone().into());
        if let Some(initrd) = &self.initrd {
            a.push("-initrd".into());
            a.push(initrd.clone().into());
        }
        if let Some(cmdline) = self.append() {
            a.push("-append".into());
            a.push(cmdline.into());
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn config() -> VmConfig {
        VmConfig {
            name: "app.ns.svc.main.instance.0".into(),
            kernel: "/s/kernel".into(),
            initrd: None,
            files: None,
            memory_mib: 128,
            vcpus: 1.5,
            net: Some(GuestNet {
                address: Ipv4Addr::new(192, 168, 1, 2),
                gateway: Ipv4Addr::new(192, 168, 1, 1),
                prefix: 30,
                mac: "02:00:00:00:00:01".into(),
                backend: Backend::Tap("tap0".into()),
            }),
            cmd: vec!["-c".into(), "/nginx.conf".into()],
            qmp_socket: "/s/q.sock".into(),
            accel: Accel::Tcg,
        }
    }

    fn text(c: &VmConfig) -> Vec<String> {
        c.args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    fn after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn the_guest_sees_upstreams_command_line() {
        let a = text(&config());
        assert_eq!(
            after(&a, "-append"),
            [
                "netdev.ipv4_addr=192.168.1.2 netdev.ipv4_gw_addr=192.168.1.1 \
              netdev.ipv4_subnet_mask=255.255.255.252 -- -c /nginx.conf"
            ]
        );
        assert_eq!(
            after(&a, "-device"),
            ["virtio-net-pci,id=nic1,addr=0x0a,netdev=tap0,mac=02:00:00:00:00:01"]
        );
        assert_eq!(
            after(&a, "-netdev"),
            ["tap,id=tap0,ifname=tap0,script=no,downscript=no"]
        );
        assert_eq!(after(&a, "-smp"), ["2"]);
        assert_eq!(after(&a, "-m"), ["128"]);
        assert_eq!(after(&a, "-qmp"), ["unix:/s/q.sock,server=on,wait=off"]);
        assert_eq!(
            after(&a, "-name"),
            ["app.ns.svc.main.instance.0,debug-threads=on"]
        );
        assert!(after(&a, "-initrd").is_empty());
    }

    #[test]
    fn files_initramfs_and_macvtap() {
        let mut c = config();
        c.files = Some("/s/files".into());
        c.initrd = Some("/s/initramfs.cpio".into());
        if let Some(n) = c.net.as_mut() {
            n.backend = Backend::Macvtap {
                device: "/dev/tap7".into(),
            };
        }
        c.accel = Accel::Kvm;
        let a = text(&c);
        assert_eq!(
            after(&a, "-fsdev"),
            [
                "local,security_model=mapped-xattr,id=hvirtio0,path=/s/files",
                "local,security_model=mapped-xattr,id=hvirtio1,path=/s/files"
            ]
        );
        assert!(a.contains(&"virtio-9p-pci,fsdev=hvirtio1,mount_tag=fs1".to_string()));
        assert_eq!(after(&a, "-initrd"), ["/s/initramfs.cpio"]);
        assert_eq!(after(&a, "-netdev"), ["tap,id=tap0,fd=3"]);
        assert_eq!(after(&a, "-cpu"), ["host"]);
    }

    #[test]
    fn without_network_only_the_arguments() {
        let mut c = config();
        c.net = None;
        assert_eq!(c.append().as_deref(), Some("-- -c /nginx.conf"));
        c.cmd.clear();
        assert_eq!(c.append(), None);
        c.memory_mib = 0;
        assert_eq!(after(&text(&c), "-m"), ["64"]);
    }
}
