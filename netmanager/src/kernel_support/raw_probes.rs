//! The two probes aya has no API for, through the raw `bpf(2)` syscall:
//! whether TCX links exist and whether `bpf_skb_adjust_room` knows the
//! decapsulation flags (Linux 6.3).

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use aya_obj::generated::{
    BPF_ALU64, BPF_CALL, BPF_EXIT, BPF_F_ADJ_ROOM_DECAP_L3_IPV6, BPF_JMP, BPF_K, BPF_MOV,
    bpf_attach_type, bpf_attr, bpf_cmd, bpf_func_id, bpf_insn, bpf_prog_type,
};

/// `BPF_ADJ_ROOM_MAC` of uapi `enum bpf_adj_room_mode` (not in aya-obj's bindings).
const BPF_ADJ_ROOM_MAC: i32 = 1;

/// TCX is there when linking a classifier to a nonexistent interface
/// fails for the interface (ENODEV) rather than for the attach type
/// (EINVAL); the probe attaches nothing.
pub(super) fn tcx_supported() -> bool {
    let insns = [mov64_imm(0, 0), exit()];
    let Ok(prog) = load_classifier(&insns) else {
        return false;
    };
    // SAFETY: zeroed is a valid bpf_attr; we fill the link_create member.
    let mut attr = unsafe { mem::zeroed::<bpf_attr>() };
    attr.link_create.__bindgen_anon_1.prog_fd = prog.as_raw_fd() as u32;
    attr.link_create.__bindgen_anon_2.target_ifindex = 0;
    attr.link_create.attach_type = bpf_attach_type::BPF_TCX_INGRESS as u32;
    match bpf_fd(bpf_cmd::BPF_LINK_CREATE, &mut attr) {
        // Cannot happen for ifindex 0, but a link would mean support; it
        // is released (and detached) when the descriptor drops.
        Ok(_link) => true,
        Err(e) => e.raw_os_error() == Some(libc::ENODEV),
    }
}

/// Runs `bpf_skb_adjust_room(skb, -28, BPF_ADJ_ROOM_MAC,
/// BPF_F_ADJ_ROOM_DECAP_L3_IPV6)` on an IPv6-in-IPv4/UDP frame: kernels
/// without the flag answer -EINVAL, which the verifier cannot tell.
pub(super) fn adjust_room_decap_l3_supported() -> bool {
    let insns = [
        // r1 is still the context when the helper is called.
        mov64_imm(2, -28),
        mov64_imm(3, BPF_ADJ_ROOM_MAC),
        mov64_imm(4, BPF_F_ADJ_ROOM_DECAP_L3_IPV6 as i32),
        call(bpf_func_id::BPF_FUNC_skb_adjust_room),
        exit(),
    ];
    let Ok(prog) = load_classifier(&insns) else {
        return false;
    };
    let frame = ipv6_in_ipv4_frame();
    let mut out = [0u8; 256];
    // SAFETY: zeroed is a valid bpf_attr; we fill the test member.
    let mut attr = unsafe { mem::zeroed::<bpf_attr>() };
    // The buffers outlive the call below.
    attr.test.prog_fd = prog.as_raw_fd() as u32;
    attr.test.data_in = frame.as_ptr() as u64;
    attr.test.data_size_in = frame.len() as u32;
    attr.test.data_out = out.as_mut_ptr() as u64;
    attr.test.data_size_out = out.len() as u32;
    attr.test.repeat = 1;
    if bpf(bpf_cmd::BPF_PROG_TEST_RUN, &mut attr).is_err() {
        return false;
    }
    // SAFETY: the kernel filled the test member.
    unsafe { attr.test.retval == 0 }
}

/// Ethernet, IPv4/UDP to port 50103, an IPv6 header with 8 bytes of payload.
fn ipv6_in_ipv4_frame() -> Vec<u8> {
    let mut f = vec![0u8; 14 + 20 + 8 + 40 + 8];
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&76u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&[198, 51, 100, 2]);
    ip[16..20].copy_from_slice(&[198, 51, 100, 1]);
    let udp = &mut f[34..42];
    udp[0..2].copy_from_slice(&50103u16.to_be_bytes());
    udp[2..4].copy_from_slice(&50103u16.to_be_bytes());
    udp[4..6].copy_from_slice(&56u16.to_be_bytes());
    let v6 = &mut f[42..82];
    v6[0] = 0x60;
    v6[4..6].copy_from_slice(&8u16.to_be_bytes());
    v6[6] = 59; // no next header
    v6[7] = 64;
    f
}

fn load_classifier(insns: &[bpf_insn]) -> io::Result<OwnedFd> {
    // SAFETY: zeroed is a valid bpf_attr; we fill the prog-load member.
    let mut attr = unsafe { mem::zeroed::<bpf_attr>() };
    let license = c"GPL";
    // SAFETY: plain integers and pointers to data that outlives the call.
    unsafe {
        let load = &mut attr.__bindgen_anon_3;
        load.prog_type = bpf_prog_type::BPF_PROG_TYPE_SCHED_CLS as u32;
        load.insn_cnt = insns.len() as u32;
        load.insns = insns.as_ptr() as u64;
        load.license = license.as_ptr() as u64;
    }
    bpf_fd(bpf_cmd::BPF_PROG_LOAD, &mut attr)
}

/// The bpf(2) system call; its non-negative result (a new descriptor or 0).
fn bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<i64> {
    // SAFETY: attr is a valid, fully initialised bpf_attr of the size we pass.
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
    Ok(r)
}

/// [`bpf`] for commands that create a descriptor.
fn bpf_fd(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<OwnedFd> {
    let fd = bpf(cmd, attr)?;
    // SAFETY: the kernel just created this descriptor for us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn insn(code: u32, dst: u8, imm: i32) -> bpf_insn {
    // SAFETY: an all-zero instruction is a valid value to start from.
    let mut i = unsafe { mem::zeroed::<bpf_insn>() };
    i.code = code as u8;
    i.set_dst_reg(dst);
    i.imm = imm;
    i
}

fn mov64_imm(dst: u8, imm: i32) -> bpf_insn {
    insn(BPF_ALU64 | BPF_MOV | BPF_K, dst, imm)
}

fn call(helper: bpf_func_id) -> bpf_insn {
    insn(BPF_JMP | BPF_CALL, 0, helper as i32)
}

fn exit() -> bpf_insn {
    insn(BPF_JMP | BPF_EXIT, 0, 0)
}
