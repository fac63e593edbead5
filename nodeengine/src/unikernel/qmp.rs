//! The QEMU Machine Protocol, as much as NodeEngine uses: the greeting and
//! capabilities handshake, `query-status` (did the VM start?) and `quit`
//! (how upstream stops a unikernel). JSON objects, one per line, over the
//! unix socket qemu serves with `-qmp unix:PATH,server=on,wait=off`.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Deadline of one QMP exchange.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest line we read from qemu (events and answers are small).
const MAX_LINE: usize = 64 << 10;

pub struct Qmp {
    stream: BufReader<UnixStream>,
}

impl Qmp {
    /// Connects and completes the handshake (greeting, `qmp_capabilities`).
    pub async fn connect(socket: &Path) -> Result<Qmp> {
        let stream = UnixStream::connect(socket)
            .await
            .with_context(|| format!("connecting to QMP at {}", socket.display()))?;
        let mut qmp = Qmp {
            stream: BufReader::new(stream),
        };
        let greeting = tokio::time::timeout(EXCHANGE_TIMEOUT, qmp.read_message())
            .await
            .map_err(|_| anyhow!("no QMP greeting within {EXCHANGE_TIMEOUT:?}"))??;
        if greeting.get("QMP").is_none() {
            bail!("unexpected QMP greeting: {greeting}");
        }
        qmp.execute("qmp_capabilities").await?;
        Ok(qmp)
    }

    /// Runs a command without arguments; its `return` value.
    pub async fn execute(&mut self, command: &str) -> Result<Value> {
        tokio::time::timeout(EXCHANGE_TIMEOUT, self.exchange(command))
            .await
            .map_err(|_| anyhow!("QMP {command}: no answer within {EXCHANGE_TIMEOUT:?}"))?
    }

    async fn exchange(&mut self, command: &str) -> Result<Value> {
        let mut line = json!({ "execute": command }).to_string();
        line.push('\n');
        self.stream
            .get_mut()
            .write_all(line.as_bytes())
            .await
            .with_context(|| format!("sending QMP {command}"))?;
        loop {
            let msg = self.read_message().await?;
            if let Some(r) = msg.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = msg.get("error") {
                bail!("QMP {command}: {e}");
            }
            // Asynchronous events ({"event": ...}) may come first.
        }
    }

    async fn read_message(&mut self) -> Result<Value> {
        let mut line = String::new();
        let n = (&mut self.stream)
            .take(MAX_LINE as u64)
            .read_line(&mut line)
            .await
            .context("reading from QMP")?;
        if n == 0 {
            bail!("qemu closed the QMP connection");
        }
        serde_json::from_str(&line).with_context(|| format!("QMP sent non-JSON: {line:?}"))
    }

    /// `query-status`: the run state ("running", "paused", "internal-error", ...).
    pub async fn status(&mut self) -> Result<String> {
        let r = self.execute("query-status").await?;
        Ok(r["status"].as_str().unwrap_or_default().to_string())
    }

    /// `quit`: qemu exits. The connection may close before the answer arrives,
    /// which is success too.
    pub async fn quit(mut self) -> Result<()> {
        match self.execute("quit").await {
            Ok(_) => Ok(()),
            Err(e) if e.to_string().contains("closed the QMP connection") => Ok(()),
            Err(e) => Err(e),
        }
    }
}
