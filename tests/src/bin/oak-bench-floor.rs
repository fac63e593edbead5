//! Bench-only: attaches the do-nothing TC program (the floor of the
//! per-packet cost measurements, `oakestra_worker_tests::floor`) first on an
//! interface's TC ingress of the current network namespace, pins its link,
//! and prints the program's id. Removing the pin detaches it.
//!
//! Usage (root): `oak-bench-floor IFNAME LINK_PIN_PATH`, or
//! `oak-bench-floor --xdp PROG_PIN_PATH`: loads the do-nothing XDP program
//! and pins the program, for `ip link set dev IF xdpgeneric|xdpdrv pinned
//! PROG_PIN_PATH` (tests/scripts/xdp_uplink_cost.sh).

use std::ffi::CString;

use anyhow::{Context, Result, bail};
use oakestra_worker_tests::floor::{Floor, Hook};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(ifname), Some(pin)) = (args.next(), args.next()) else {
        bail!("usage: oak-bench-floor IFNAME LINK_PIN_PATH | --xdp PROG_PIN_PATH");
    };
    if ifname == "--xdp" {
        let floor = Floor::load_for(Hook::Xdp)?;
        floor.pin_program(&pin)?;
        println!("{}", floor.id()?);
        return Ok(());
    }
    let name = CString::new(ifname.clone()).context("interface name")?;
    // SAFETY: a NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        bail!("no interface {ifname} here");
    }
    let floor = Floor::load()?;
    floor.attach_ingress_first(ifindex, &pin)?;
    println!("{}", floor.id()?);
    Ok(())
}
