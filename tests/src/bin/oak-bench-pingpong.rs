//! Bench-only request/response latency probe (not part of the product).
//!
//! `oak-bench-pingpong server PORT` echoes fixed-size messages on every
//! accepted TCP connection (prints `ready` once listening).
//! `oak-bench-pingpong rr HOST PORT COUNT SIZE` does COUNT round trips of SIZE
//! bytes on one connection and prints JSON percentiles in microseconds.
//! `oak-bench-pingpong connect HOST PORT COUNT` opens COUNT fresh connections
//! and prints JSON percentiles of the connect() time in microseconds.
//! `oak-bench-pingpong hold HOST PORT` keeps one connection until its
//! stdin closes, a 64-byte round trip every 5 ms, and prints JSON: round
//! trips, the longest wait for an answer and the error that ended it early,
//! if any (an established flow surviving a dataplane restart).
//! (A native client rather than python: interpreter jitter would dominate a
//! 30 us round trip.)

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["server", port] => server(port.parse().context("port")?),
        ["rr", host, port, count, size] => rr(host, port.parse()?, count.parse()?, size.parse()?),
        ["connect", hosts, port, count] => connect(hosts, port.parse()?, count.parse()?),
        ["hold", host, port] => hold(host, port.parse()?),
        _ => bail!(
            "usage: oak-bench-pingpong server PORT | rr HOST PORT COUNT SIZE | connect HOST[,HOST..] PORT COUNT | hold HOST PORT"
        ),
    }
}

fn server(port: u16) -> Result<()> {
    let l = TcpListener::bind(("::", port)).with_context(|| format!("binding port {port}"))?;
    println!("ready");
    for s in l.incoming() {
        let Ok(mut s) = s else { continue };
        std::thread::spawn(move || {
            let _ = s.set_nodelay(true);
            let mut buf = vec![0u8; 65536];
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
    Ok(())
}

fn addr(host: &str, port: u16) -> Result<SocketAddr> {
    Ok(SocketAddr::new(host.parse().context("host address")?, port))
}

fn rr(host: &str, port: u16, count: usize, size: usize) -> Result<()> {
    let mut s = TcpStream::connect_timeout(&addr(host, port)?, Duration::from_secs(5))
        .with_context(|| format!("connecting to {host}:{port}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let msg = vec![0x5au8; size];
    let mut back = vec![0u8; size];
    // Warm-up: flow caches, ARP, TCP slow start are not what we measure.
    for _ in 0..100 {
        s.write_all(&msg)?;
        s.read_exact(&mut back)?;
    }
    let mut us = Vec::with_capacity(count);
    for _ in 0..count {
        let t = Instant::now();
        s.write_all(&msg)?;
        s.read_exact(&mut back).context("reading the echo")?;
        us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    print_stats(&mut us);
    Ok(())
}

fn hold(host: &str, port: u16) -> Result<()> {
    let mut s = TcpStream::connect_timeout(&addr(host, port)?, Duration::from_secs(5))
        .with_context(|| format!("connecting to {host}:{port}"))?;
    s.set_nodelay(true)?;
    // Longer than any restart we accept: a stall is measured, not an error.
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let msg = [0x5au8; 64];
    let mut back = [0u8; 64];
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        flag.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let (mut n, mut max_ms) = (0u64, 0f64);
    let mut error = None;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let t = Instant::now();
        let r = s.write_all(&msg).and_then(|()| s.read_exact(&mut back));
        if let Err(e) = r {
            error = Some(e.to_string());
            break;
        }
        n += 1;
        max_ms = max_ms.max(t.elapsed().as_secs_f64() * 1e3);
        std::thread::sleep(Duration::from_millis(5));
    }
    println!(
        "{}",
        serde_json::json!({"round_trips": n, "max_wait_ms": max_ms, "error": error})
    );
    Ok(())
}

/// Connect times to each of a comma-separated list of hosts in turn
/// (a list of never-seen service addresses measures the first-packet path).
fn connect(hosts: &str, port: u16, count: usize) -> Result<()> {
    let hosts: Vec<&str> = hosts.split(',').collect();
    let mut us = Vec::with_capacity(count);
    for i in 0..count {
        let a = addr(hosts[i % hosts.len()], port)?;
        let t = Instant::now();
        let s = TcpStream::connect_timeout(&a, Duration::from_secs(5))
            .with_context(|| format!("connecting to {a}"))?;
        us.push(t.elapsed().as_secs_f64() * 1e6);
        drop(s);
    }
    print_stats(&mut us);
    Ok(())
}

fn print_stats(us: &mut [f64]) {
    us.sort_by(f64::total_cmp);
    let pct = |p: f64| us[((us.len() - 1) as f64 * p).round() as usize];
    let mean = us.iter().sum::<f64>() / us.len() as f64;
    println!(
        "{{\"count\":{},\"mean_us\":{mean:.2},\"p50_us\":{:.2},\"p99_us\":{:.2},\"max_us\":{:.2}}}",
        us.len(),
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
}
