//! What the dataplane can be asked without changing it: status and
//! counters for `NetManager status` and the metrics, single flows and
//! pending marks for tests and tools, and `BPF_PROG_TEST_RUN`.

use std::net::IpAddr;

use aya::programs::{Program, TestRun, TestRunOptions, TestRunResult};
use netmanager_common::Counter;

use super::{Dataplane, DataplaneError, Result, SlowPathStatus};

/// What `NetManager status` prints about the dataplane.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DataplaneStatus {
    /// How programs are attached: "tcx" or "netlink".
    #[serde(default)]
    pub attach_mode: String,
    /// (program, interface, hook)
    pub attachments: Vec<(String, String, String)>,
    /// (map, entries, max entries)
    pub maps: Vec<(String, u32, u32)>,
    /// (counter, packets, bytes)
    pub counters: Vec<(String, u64, u64)>,
    /// The node's addresses tunnel datagrams are accepted on.
    #[serde(default)]
    pub node_addresses: Vec<String>,
    /// The slow-path socket's work, when it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow_path: Option<SlowPathStatus>,
}

impl Dataplane {
    /// The node the tables name for instance address `ip` (the only
    /// sender its tunnel datagrams are accepted from).
    pub fn instance_node(&self, ip: IpAddr) -> Result<Option<IpAddr>> {
        Ok(self.lock().tables.instance_node(ip))
    }

    /// (opened, closed) flows counted for the container whose veth has
    /// `ifindex`; the difference is what it holds.
    pub fn flow_counts(&self, ifindex: u32) -> Result<(u64, u64)> {
        Ok(self.lock().tables.flow_counts(ifindex))
    }

    /// Packets and bytes per counter, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<(Counter, u64, u64)>> {
        self.lock().tables.counters()
    }

    /// Snapshot for `NetManager status`.
    pub fn status(&self) -> Result<DataplaneStatus> {
        let state = self.lock();
        Ok(DataplaneStatus {
            attach_mode: state.attachments.mode().to_string(),
            attachments: state.attachments.list(),
            maps: state.tables.fill(&state.cfg.sizes),
            counters: state
                .tables
                .counters()?
                .into_iter()
                .map(|(c, p, b)| (c.name().to_string(), p, b))
                .collect(),
            node_addresses: state
                .underlay
                .addresses
                .keys()
                .map(|a| a.to_string())
                .collect(),
            slow_path: self.slow_path.as_ref().map(|c| c.status()),
        })
    }

    /// The forward flow cached for `key`, if any (tests, inspection).
    pub fn flow(
        &self,
        key: &netmanager_common::FlowKey,
    ) -> Result<Option<netmanager_common::Flow>> {
        Ok(self.lock().tables.flow(key))
    }

    /// The reverse flow cached for `key`, if any.
    pub fn reverse_flow(
        &self,
        key: &netmanager_common::FlowKey,
    ) -> Result<Option<netmanager_common::ReverseFlow>> {
        Ok(self.lock().tables.reverse_flow(key))
    }

    /// Packets held for an unknown address, if a resolution is pending.
    pub fn pending(&self, addr: IpAddr) -> Result<Option<u32>> {
        Ok(self.lock().tables.pending(addr))
    }

    /// Runs a loaded program on a crafted packet (`BPF_PROG_TEST_RUN`), for
    /// tests and benchmarks.
    pub fn test_run(&self, program: &str, opts: TestRunOptions<'_>) -> Result<TestRunResult> {
        let state = self.lock();
        let ran = match state.ebpf.program(program) {
            Some(Program::SchedClassifier(p)) => p.test_run(opts),
            Some(Program::Xdp(p)) => p.test_run(opts),
            Some(_) => {
                return Err(DataplaneError::Other(format!(
                    "program {program} cannot be test-run here"
                )));
            }
            None => return Err(DataplaneError::Other(format!("no program {program}"))),
        };
        ran.map_err(|e| DataplaneError::bpf(format!("BPF_PROG_TEST_RUN of {program}"), e))
    }
}
