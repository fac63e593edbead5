//! The sandbox's demo application: an HTTP echo service (busybox httpd,
//! answering with its instance and node) and a client that fetches the
//! service's round-robin address in a loop.

use testkit::JobSpec;
use testkit::image::SANDBOX_IMAGE;

pub const SERVER_JOB: &str = "demo.sandbox.echo.web";
pub const CLIENT_JOB: &str = "demo.sandbox.client.loop";

fn sh(script: String) -> Vec<String> {
    vec!["sh".into(), "-c".into(), script]
}

/// busybox httpd on port 80 serving "hello from instance-<n> on <node>".
pub fn echo_server(node_label: &str) -> JobSpec {
    JobSpec {
        job_name: SERVER_JOB.into(),
        image: SANDBOX_IMAGE.into(),
        cmd: sh(
            "echo \"hello from $HOSTNAME on $OAK_NODE\" > /www/index.html && \
                 exec httpd -f -v -p 80 -h /www"
                .into(),
        ),
        environment: vec![format!("OAK_NODE={node_label}")],
    }
}

/// An HTTP GET of `http://<rr_ip>/` every second through `nc` (busybox
/// wget segfaults in the static Debian build); each answer lands in the
/// app log.
pub fn client(rr_ip: &str) -> JobSpec {
    JobSpec {
        job_name: CLIENT_JOB.into(),
        image: SANDBOX_IMAGE.into(),
        cmd: sh(format!(
            "while true; do echo \"$(date +%T) $(printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {rr_ip} 80 2>&1 | tail -n 1)\"; sleep 1; done"
        )),
        environment: Vec::new(),
    }
}

/// A long-running container to attach test traffic to (tests run their
/// programs inside its network namespace).
pub fn idle(job_name: &str) -> JobSpec {
    JobSpec {
        job_name: job_name.into(),
        image: SANDBOX_IMAGE.into(),
        cmd: vec!["sleep".into(), "100000".into()],
        environment: Vec::new(),
    }
}
