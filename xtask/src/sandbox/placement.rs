//! Where the sandbox's cluster puts an instance: on the least loaded worker
//! that meets the service's requirements as far as the sandbox can tell
//! them from the node's registration document (architecture, runtimes,
//! memory and CPUs it reported; a `direct` constraint's node names).
//! Like upstream's cluster scheduler, memory and CPUs are compared with
//! what the node reported, not summed over the instances placed there.

use anyhow::{Result, bail};
use serde_json::Value;

use super::sla::Requirements;

/// What the cluster knows about one worker.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    pub index: u8,
    pub hostname: String,
    pub architecture: String,
    pub virtualization: Vec<String>,
    /// MiB available at registration.
    pub memory: u64,
    pub vcpus: u64,
    /// Instances the workbench placed there.
    pub load: usize,
}

impl Candidate {
    /// From the node's registration document (`POST /api/node/register`).
    pub fn from_registration(index: u8, hostname: &str, doc: &Value, load: usize) -> Candidate {
        Candidate {
            index,
            hostname: hostname.to_string(),
            architecture: doc["architecture"].as_str().unwrap_or("").to_string(),
            virtualization: doc["virtualization"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            memory: doc["memory"].as_u64().unwrap_or(0),
            vcpus: doc["vcpus"].as_u64().unwrap_or(0),
            load,
        }
    }

    /// Why this worker cannot take an instance needing `req` (None: it can).
    fn unfit(&self, req: &Requirements) -> Option<String> {
        if !req.nodes.is_empty() && !req.nodes.contains(&self.hostname) {
            return Some(format!("not among the nodes {:?}", req.nodes));
        }
        if !req.arch.is_empty() && !req.arch.contains(&self.architecture) {
            return Some(format!(
                "architecture {} not in {:?}",
                self.architecture, req.arch
            ));
        }
        if !self.virtualization.contains(&req.virtualization) {
            return Some(format!(
                "offers {:?}, not {}",
                self.virtualization, req.virtualization
            ));
        }
        if req.memory > self.memory {
            return Some(format!(
                "{} MiB free, {} MiB asked",
                self.memory, req.memory
            ));
        }
        if req.vcpus > self.vcpus {
            return Some(format!("{} vCPUs, {} asked", self.vcpus, req.vcpus));
        }
        None
    }
}

/// Places `count` instances one by one, each on the least loaded fitting
/// worker (the lower index on a tie); the worker index of each. Fails
/// naming every worker's reason when none fits.
pub fn place(candidates: &[Candidate], req: &Requirements, count: usize) -> Result<Vec<u8>> {
    let mut fitting: Vec<Candidate> = Vec::new();
    let mut reasons = Vec::new();
    for c in candidates {
        match c.unfit(req) {
            None => fitting.push(c.clone()),
            Some(why) => reasons.push(format!("worker {} ({}): {why}", c.index, c.hostname)),
        }
    }
    if fitting.is_empty() {
        bail!("no worker can run it: {}", reasons.join("; "));
    }
    let mut chosen = Vec::with_capacity(count);
    for _ in 0..count {
        let Some(best) = fitting.iter_mut().min_by_key(|c| (c.load, c.index)) else {
            break;
        };
        best.load += 1;
        chosen.push(best.index);
    }
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn worker(index: u8, load: usize) -> Candidate {
        let doc = json!({"architecture": "amd64", "virtualization": ["docker"],
                         "memory": 2048, "vcpus": 2});
        Candidate::from_registration(index, &format!("w{index}"), &doc, load)
    }

    fn docker() -> Requirements {
        Requirements {
            virtualization: "docker".into(),
            ..Default::default()
        }
    }

    #[test]
    fn instances_spread_over_the_least_loaded_workers() {
        let ws = [worker(1, 1), worker(2, 0), worker(3, 0)];
        assert_eq!(place(&ws, &docker(), 4).unwrap(), [2, 3, 1, 2]);
    }

    #[test]
    fn requirements_narrow_the_choice() {
        let ws = [worker(1, 0), worker(2, 5)];
        let direct = Requirements {
            nodes: vec!["w2".into()],
            ..docker()
        };
        assert_eq!(place(&ws, &direct, 2).unwrap(), [2, 2]);
        let arm = Requirements {
            arch: vec!["arm64".into()],
            ..docker()
        };
        let e = place(&ws, &arm, 1).unwrap_err().to_string();
        assert!(e.contains("worker 1 (w1): architecture amd64"), "{e}");
        assert!(e.contains("worker 2 (w2)"), "{e}");
    }

    #[test]
    fn impossible_asks_say_why() {
        let ws = [worker(1, 0)];
        for (req, why) in [
            (
                Requirements {
                    memory: 4096,
                    ..docker()
                },
                "2048 MiB free, 4096 MiB asked",
            ),
            (
                Requirements {
                    vcpus: 8,
                    ..docker()
                },
                "2 vCPUs, 8 asked",
            ),
            (
                Requirements {
                    virtualization: "unikernel".into(),
                    ..Default::default()
                },
                "not unikernel",
            ),
        ] {
            let e = place(&ws, &req, 1).unwrap_err().to_string();
            assert!(e.contains(why), "{e}");
        }
    }
}
