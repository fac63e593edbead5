//! Oakestra NodeEngine: joins an Oakestra cluster and runs its workloads.
//!
//! `NodeEngine` (the CLI, [`cli`]) edits [`config`] and controls the service;
//! `nodeengined` (the daemon, [`daemon`]) registers with the cluster
//! ([`cluster_link`]), keeps an MQTT session with it ([`cluster_mqtt`]), reports
//! the node ([`node_report`]) and runs deployments ([`deploy`]) on containerd
//! ([`containerd_runtime`]) or qemu ([`unikernel`]), attaching them to the overlay
//! through NetManager ([`netmanager_client`], [`netmanager_supervisor`]) and
//! their volumes to CSI drivers ([`csi`]).

pub mod addons;
pub mod app_logs;
pub mod cgroup_stats;
pub mod cli;
pub mod cluster_link;
pub mod cluster_mqtt;
pub mod config;
pub mod config_check;
pub mod containerd_runtime;
pub mod csi;
pub mod daemon;
pub mod deploy;
pub mod gpu;
pub mod image_user;
pub mod job;
pub mod last_report;
pub mod metrics;
pub mod netmanager_client;
pub mod netmanager_supervisor;
pub mod node_report;
pub mod oci_spec;
pub mod public_ip;
pub mod resolv_conf;
pub mod runtimes;
pub mod seccomp;
pub mod service;
pub mod unikernel;
