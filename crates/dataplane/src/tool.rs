//! Running a kernel tool (`nft -f -`, `iptables-restore`, ...) with its input on stdin,
//! shared by the backends that program through one.

use std::io::Write as _;
use std::process::{Command, Stdio};

use svcplane_proxy::DataplaneError;

/// How many lines of a tool's complaint an error carries.
const ERROR_LINES: usize = 6;

/// Run `cmd`, feeding `input` on stdin; its stdout on success, else a
/// [`DataplaneError::Tool`] named `tool` with the first lines of its stderr.
pub(crate) fn run(
    mut cmd: Command,
    tool: &str,
    input: Option<&str>,
) -> Result<String, DataplaneError> {
    let tool_error = |message: String| DataplaneError::Tool {
        tool: tool.to_owned(),
        message,
    };
    let mut child = cmd
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| tool_error(format!("cannot run: {e}")))?;
    let (output, written) = std::thread::scope(|scope| {
        // Fed from another thread so a large input cannot deadlock against the
        // tool's output pipes.
        let writer = child
            .stdin
            .take()
            .zip(input)
            .map(|(mut stdin, text)| scope.spawn(move || stdin.write_all(text.as_bytes())));
        let output = child.wait_with_output();
        (output, writer.map(|w| w.join()))
    });
    let output = output.map_err(|e| tool_error(format!("waiting for it: {e}")))?;
    if output.status.success() {
        return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let mut message: String = stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .take(ERROR_LINES)
        .collect::<Vec<_>>()
        .join("\n");
    if message.is_empty() {
        message = format!("exited with {}", output.status);
        if let Some(Ok(Err(e))) = written {
            message.push_str(&format!(" (writing its input failed: {e})"));
        }
    }
    Err(tool_error(message))
}
