//! Parser fuzzing of everything a peer hands NodeEngine (issue 12, "the
//! adversarial suite"): the MQTT job documents (`control/deploy`,
//! `control/delete`) down to the container spec they make, the cluster's
//! registration answer, the image's account files behind its `USER`, and
//! `conf.json`. Property: every input parses or returns an error -- never a
//! panic -- and what parses holds the rules the rest of the daemon relies
//! on. The process stays under the memory cap (fuzz_support).
//!
//! CI runs a fixed-seed share; `OAK_FUZZ_CASES` runs more.

#[path = "../../netmanager/tests/fuzz_support/mod.rs"]
mod fuzz_support;

use std::path::Path;

use fuzz_support::{byte_mutated, fail, fuzz, payloads};
use nodeengine::cluster_link::parse_answer;
use nodeengine::config::Config;
use nodeengine::image_user::{ProcessUser, resolve};
use nodeengine::job::{identify, lenient_ports, parse_delete, parse_deploy};
use nodeengine::oci_spec::{ImageDefaults, SpecInput, build_spec};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use worker_common::task_id::{parse_task_id, task_id, validate_job_name};

const DEPLOY_JOB: &str = include_str!("fixtures/deploy-job.json");
const CONF_JSON: &str = include_str!("fixtures/conf.json");
/// A deploy document with what the fixture leaves out: CSI volumes,
/// numbers as strings, keys in another case, privileged, another runtime.
const DEPLOY_RICH: &str = r#"{"Job_Name":"a.b.c.d","INSTANCE_NUMBER":"3","Image":"x","memory":"64","vcpus":"0.5","vgpus":"1","privileged":"true","one_shot":true,"virtualization":"unikernel","platform":"linux/amd64","environment":["A=1","B"],"cmd":["sh"],"port":"80:80;80:81/udp;0:1","volumes":[{"volume_id":"v1","csi_driver":"d","mount_path":"/data","config":{"size":3,"ro":true}}]}"#;
const DELETE_JOB: &str =
    r#"{"job_name":"clientsrvr.test.curl.test","instance_number":0,"virtualization":"docker"}"#;
const CONF_FULL: &str = r#"{"conf_version":"1.0","cluster_address":"cluster.example","cluster_ssl":true,"cluster_port":10100,"app_logs":"/var/log/oakestra","overlay_network":"custom:/run/nm.sock","public_ip":"auto","overlay_network_port":0,"mqtt_cert_file":"/etc/c.pem","mqtt_key_file":"/etc/k.pem","addons":[],"virtualizations":[],"csi_drivers":[{"csi_driver_name":"d","csi_driver_endpoint":"/run/d.sock"}],"mqtt_username":"node","mqtt_password_file":"/etc/pw","mqtt_tls":true,"mqtt_ca_file":"/etc/ca.pem","local_policy":{"allow_privileged":true,"allow_unknown_runtimes":false},"mode":"x"}"#;
const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\napp:x:1000:1000::/home/app:/bin/sh\n";
const GROUP: &str = "root:x:0:\nnogroup:x:65534:\napp:x:1000:\nfuse:x:107:nobody,app\n";

fn ensure(ok: bool, what: impl std::fmt::Display, input: &[u8]) -> Result<(), TestCaseError> {
    if ok { Ok(()) } else { Err(fail(what, input)) }
}

/// A job name the daemon accepted makes a task id (container id, netns,
/// log file name) that reads back as itself.
fn check_name(name: &str, instance: u32, input: &[u8]) -> Result<(), TestCaseError> {
    ensure(
        validate_job_name(name).is_ok() && !name.contains(['+', '#', '/', '\0']),
        format!("job name {name:?} accepted"),
        input,
    )?;
    let id = task_id(name, instance);
    ensure(
        parse_task_id(&id) == Some((name.to_string(), instance)),
        format!("task id {id:?} does not read back"),
        input,
    )
}

/// `nodes/<id>/control/deploy`, through validation into the OCI spec.
#[test]
fn deploy_documents() {
    fuzz(
        "control/deploy",
        payloads(
            vec![DEPLOY_JOB, DEPLOY_RICH],
            &["volume_id", "csi_driver", "mount_path", "config"],
        ),
        |input| {
            let _ = identify(input);
            let Ok(d) = parse_deploy(input) else {
                return Ok(());
            };
            check_name(&d.job_name, d.instance, input)?;
            ensure(
                d.memory_mib <= 1 << 20 && d.vcpus <= 1024.0,
                format!("memory {} MiB, {} vcpus", d.memory_mib, d.vcpus),
                input,
            )?;
            ensure(
                !d.cmd.iter().chain(&d.environment).any(|s| s.contains('\0'))
                    && !d.environment.iter().any(|e| e.starts_with('=')),
                format!("cmd {:?} env {:?}", d.cmd, d.environment),
                input,
            )?;
            for v in &d.volumes {
                ensure(
                    v.mount_path.starts_with('/')
                        && !v.mount_path.split('/').any(|c| c == "..")
                        && v.mount_path != "/",
                    format!("volume mounted at {:?}", v.mount_path),
                    input,
                )?;
            }
            let image = ImageDefaults {
                env: vec!["PATH=/bin".into()],
                entrypoint: vec!["/bin/app".into()],
                cmd: vec!["--serve".into()],
                working_dir: "/srv".into(),
                user: String::new(),
            };
            let spec = build_spec(&SpecInput {
                namespace: "oakestra",
                id: &d.task_id(),
                instance: d.instance,
                image: &image,
                cmd: &d.cmd,
                environment: &d.environment,
                vcpus: d.vcpus,
                memory_mib: d.memory_mib,
                user: &ProcessUser::default(),
                resolv_conf: Path::new("/run/oakestra/resolv.conf"),
                devices: &[],
                prestart_hooks: &[],
            });
            // Whatever the document says, the spec keeps the confinement.
            ensure(
                spec["linux"]["seccomp"].is_object()
                    && spec["linux"]["resources"]["pids"]["limit"]
                        .as_i64()
                        .is_some_and(|l| l > 0)
                    && spec["process"]["user"]["uid"] == 0
                    && spec["linux"]["devices"]
                        .as_array()
                        .is_some_and(Vec::is_empty),
                format!("spec lost its confinement: {}", spec["linux"]),
                input,
            )
        },
    );
}

/// `nodes/<id>/control/delete`.
#[test]
fn delete_documents() {
    fuzz(
        "control/delete",
        payloads(vec![DELETE_JOB, DEPLOY_JOB], &[]),
        |input| match parse_delete(input) {
            Ok(d) => check_name(&d.job_name, d.instance, input),
            Err(_) => Ok(()),
        },
    );
}

/// A job's `port`: whatever is kept never maps host port 0.
#[test]
fn job_port_mappings() {
    let ports = prop_oneof![
        byte_mutated(vec![
            "9080:80/tcp;9081;0:90;9080:82/udp;9080:83/tcp",
            "80:80;80:81/udp"
        ]),
        prop::collection::vec(any::<u8>(), 0..128),
    ]
    .boxed();
    fuzz("job port", ports, |input| {
        let (kept, _) = lenient_ports(&String::from_utf8_lossy(input));
        ensure(
            !kept.split(';').any(|i| {
                let host = i.split(['/', ':']).next().unwrap_or_default().trim();
                host.parse::<u16>() == Ok(0)
            }),
            format!("kept {kept:?}"),
            input,
        )
    });
}

/// The cluster's answer to `POST /api/node/register`: the node id becomes
/// MQTT topic levels, so only a plain token is taken.
#[test]
fn registration_answers() {
    fuzz(
        "registration answer",
        payloads(
            vec![
                r#"{"id":"6650aa00bb22cc33dd440002","MQTT_BROKER_PORT":"10003"}"#,
                r#"{"id":"n-1_x","MQTT_BROKER_PORT":10003,"extra":[1]}"#,
            ],
            &[],
        ),
        |input| match parse_answer(input) {
            Ok(r) => ensure(
                r.mqtt_port != 0
                    && !r.node_id.is_empty()
                    && r.node_id
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
                format!("accepted node id {:?} port {}", r.node_id, r.mqtt_port),
                input,
            ),
            Err(_) => Ok(()),
        },
    );
}

/// `/etc/oakestra/conf.json`: what parses is written back and reads back
/// the same (NodeEngine edits the file in place).
#[test]
fn conf_json() {
    let path = Path::new("/etc/oakestra/conf.json");
    fuzz(
        "conf.json",
        payloads(vec![CONF_JSON, CONF_FULL], &[]),
        |input| {
            let Ok(cfg) = Config::parse(&String::from_utf8_lossy(input), path) else {
                return Ok(());
            };
            let _ = (cfg.network_mode(), cfg.public_ip(), cfg.active_runtimes());
            let written = cfg.to_json();
            match Config::parse(&written, path) {
                Ok(again) => ensure(
                    same_config(&cfg, &again),
                    format!("{written} reads back differently"),
                    input,
                ),
                Err(e) => Err(fail(format!("{written} does not read back: {e}"), input)),
            }
        },
    );
}

/// Equal, except that floats among the keys kept as JSON may differ in the
/// last bit: serde_json (without `float_roundtrip`) reads a float it wrote
/// to within one ULP.
fn same_config(a: &Config, b: &Config) -> bool {
    let typed = |c: &Config| Config {
        public_ip: serde_json::Value::Null,
        extra: serde_json::Map::new(),
        ..c.clone()
    };
    typed(a) == typed(b)
        && same_json(&a.public_ip, &b.public_ip)
        && same_json(
            &serde_json::Value::Object(a.extra.clone()),
            &serde_json::Value::Object(b.extra.clone()),
        )
}

fn same_json(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() && y.is_f64() => {
            let (x, y) = (x.as_f64().unwrap_or(0.0), y.as_f64().unwrap_or(0.0));
            x == y || (x - y).abs() <= f64::EPSILON * x.abs().max(y.abs())
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_json(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w)))
        }
        _ => a == b,
    }
}

/// The image's `USER` against its `/etc/passwd` and `/etc/group` (the image
/// comes from whoever the cluster names).
#[test]
fn image_users() {
    let user = prop_oneof![
        prop::sample::select(vec![
            "",
            "root",
            "nobody",
            "app",
            "nobody:nogroup",
            "app:fuse",
            "1000",
            "1000:1000",
            "65534:app",
            ":",
            "a:",
            ":b",
            "4294967296",
            "nobody:4294967296",
            "x:y:z",
        ])
        .prop_map(String::from),
        prop::collection::vec(any::<char>(), 0..16).prop_map(String::from_iter),
    ];
    let file = |fixture: &'static str| {
        prop::option::of(prop_oneof![
            byte_mutated(vec![fixture]),
            prop::collection::vec(any::<u8>(), 0..256),
        ])
    };
    let inputs = (user, file(PASSWD), file(GROUP))
        .prop_map(|(u, p, g)| {
            serde_json::to_vec(&(
                u,
                p.map(|p| String::from_utf8_lossy(&p).into_owned()),
                g.map(|g| String::from_utf8_lossy(&g).into_owned()),
            ))
            .expect("strings serialise")
        })
        .boxed();
    fuzz("image USER", inputs, |input| {
        let Ok((user, passwd, group)) =
            serde_json::from_slice::<(String, Option<String>, Option<String>)>(input)
        else {
            // The hostile documents are not (user, passwd, group) triples.
            return Ok(());
        };
        match resolve(&user, passwd.as_deref(), group.as_deref()) {
            // A numeric user is that uid, whatever the files say.
            Ok(u) => match user.trim().split(':').next().map(str::parse::<u32>) {
                Some(Ok(uid)) => ensure(u.uid == uid, format!("{user:?} ran as {}", u.uid), input),
                _ => Ok(()),
            },
            Err(_) => Ok(()),
        }
    });
}

/// The checks above would pass on parsers that refuse everything: the
/// fixtures must still be accepted.
#[test]
fn fixtures_are_accepted() {
    assert!(parse_deploy(DEPLOY_JOB.as_bytes()).is_ok());
    let rich = parse_deploy(DEPLOY_RICH.as_bytes()).expect("rich document parses");
    assert!(rich.privileged && rich.volumes.len() == 1, "{rich:?}");
    assert!(parse_delete(DELETE_JOB.as_bytes()).is_ok());
    assert!(Config::parse(CONF_JSON, Path::new("conf.json")).is_ok());
    assert!(Config::parse(CONF_FULL, Path::new("conf.json")).is_ok());
    assert_eq!(
        resolve("nobody", Some(PASSWD), Some(GROUP)).map(|u| u.uid),
        Ok(65534)
    );
}
