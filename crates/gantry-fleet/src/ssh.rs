//! SSH delivery to one device: the artifact copied with `scp`, then the install command run
//! with `ssh` — OpenSSH's own client, with key authentication only (`BatchMode`, one identity)
//! and host keys checked against a known_hosts file the operator gives (never trusted on first
//! use: an unknown or changed host key is a refusal).
//!
//! The device address is `[user@]host[:port]`. The artifact lands in `remote_dir` as
//! `gantry-<version>-<sha256 prefix>.bin`; the install command is run through the device's
//! shell with `{path}`, `{version}`, `{sha256}`, `{signature}` and `{device}` replaced (each
//! shell-quoted). With a version command, the health gate runs it until it prints the new
//! version.
//!
//! Outcomes, as for HTTP: connection failures and timeouts are retried with the policy's
//! backoff ([`Outcome::Failed`] when they run out); a host key that does not verify, a refused
//! key, or an install command that exits non-zero is a refusal, never retried
//! ([`Outcome::Rejected`], `status` 0, the command's stderr as the error).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use gantry_runtime::retry::RetryPolicy;
use tokio::process::Command;

use crate::delivery::Outcome;
use crate::registry::Artifact;

/// What a rollout keeps of its SSH settings (the rest comes from its push settings).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SshSpec {
    /// The private key to log in with.
    pub identity: PathBuf,
    /// The known_hosts file the device's host key must be in.
    pub known_hosts: PathBuf,
    /// Run on the device after the copy.
    pub install_command: String,
    /// Prints the version the device runs (the health gate, and the check after a crash).
    #[serde(default)]
    pub version_command: Option<String>,
    /// Where the artifact is copied on the device.
    pub remote_dir: String,
}

impl SshSpec {
    /// The push settings: these, with the timeouts and retries of `push`.
    pub fn options(&self, push: &crate::delivery::PushOptions) -> SshOptions {
        SshOptions {
            identity: self.identity.clone(),
            known_hosts: self.known_hosts.clone(),
            install_command: self.install_command.clone(),
            version_command: self.version_command.clone(),
            remote_dir: self.remote_dir.clone(),
            connect_timeout: push.request_timeout,
            retry: push.retry.clone(),
            gate_timeout: push.gate_timeout,
            gate_interval: push.gate_interval,
        }
    }
}

/// SSH push settings.
#[derive(Debug, Clone)]
pub struct SshOptions {
    /// The private key to log in with.
    pub identity: PathBuf,
    /// The known_hosts file the device's host key must be in.
    pub known_hosts: PathBuf,
    /// Run on the device after the copy; see the module docs for its placeholders.
    pub install_command: String,
    /// Run on the device by the health gate; must print the new version. None: no gate.
    pub version_command: Option<String>,
    /// Where the artifact is copied on the device.
    pub remote_dir: String,
    /// Connect timeout (and of each gate check).
    pub connect_timeout: Duration,
    /// Retries of transient failures.
    pub retry: RetryPolicy,
    /// How long the device has to report the new version.
    pub gate_timeout: Duration,
    /// Pause between the gate's checks.
    pub gate_interval: Duration,
}

/// `[user@]host[:port]` → (`user@host` or `host`, port).
fn target(address: &str) -> Result<(String, u16), String> {
    let (login, port) = match address.rsplit_once(':') {
        Some((login, port)) => (
            login,
            port.parse::<u16>()
                .map_err(|_| format!("address {address:?}: port {port:?} is not a number"))?,
        ),
        None => (address, 22),
    };
    if login.is_empty() || login.ends_with('@') || login.contains(char::is_whitespace) {
        return Err(format!("address {address:?} is not [user@]host[:port]"));
    }
    Ok((login.to_owned(), port))
}

/// Single-quotes `s` for a POSIX shell.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn common_args(options: &SshOptions) -> Vec<String> {
    let mut args = vec!["-i".to_owned()];
    args.push(options.identity.display().to_string());
    for o in [
        "IdentitiesOnly=yes".to_owned(),
        "BatchMode=yes".to_owned(),
        "StrictHostKeyChecking=yes".to_owned(),
        format!("UserKnownHostsFile={}", options.known_hosts.display()),
        "GlobalKnownHostsFile=/dev/null".to_owned(),
        format!(
            "ConnectTimeout={}",
            options.connect_timeout.as_secs().max(1)
        ),
        "LogLevel=ERROR".to_owned(),
    ] {
        args.push("-o".to_owned());
        args.push(o);
    }
    args
}

/// `ssh` arguments running `command` as `login` on `port`.
fn ssh_args(options: &SshOptions, login: &str, port: u16, command: &str) -> Vec<String> {
    let mut args = common_args(options);
    args.extend([
        "-p".to_owned(),
        port.to_string(),
        login.to_owned(),
        command.to_owned(),
    ]);
    args
}

enum Step {
    Ok(String),
    Transient(String),
    Refused(String),
}

/// Runs `program args`, classifying the failure by what OpenSSH said.
async fn run(program: &str, args: &[String], limit: Duration) -> Step {
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let output = match tokio::time::timeout(limit, child).await {
        Err(_) => return Step::Transient(format!("{program}: no answer within {limit:?}")),
        Ok(Err(e)) => return Step::Refused(format!("cannot run {program}: {e}")),
        Ok(Ok(output)) => output,
    };
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        return Step::Ok(stdout);
    }
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    let said = |s: &str| stderr.contains(s);
    if said("Host key verification failed")
        || said("Permission denied")
        || said("REMOTE HOST IDENTIFICATION HAS CHANGED")
        || said("No such file or directory") && program == "scp"
    {
        return Step::Refused(stderr);
    }
    // ssh exits 255 for its own errors; anything else is the remote command's status.
    let ssh_error = program == "scp" || output.status.code() == Some(255);
    if ssh_error {
        Step::Transient(if stderr.is_empty() {
            format!("{program} exited with {}", output.status)
        } else {
            stderr
        })
    } else {
        Step::Refused(format!(
            "the command exited with {}: {}",
            output.status,
            if stderr.is_empty() {
                stdout.trim()
            } else {
                &stderr
            }
        ))
    }
}

/// Runs the version command on the device at `address`: the version it reports, or why not.
pub async fn version(address: &str, options: &SshOptions) -> Result<String, String> {
    let (login, port) = target(address)?;
    let Some(command) = &options.version_command else {
        return Err("no version command".into());
    };
    let args = ssh_args(options, &login, port, command);
    match run("ssh", &args, options.connect_timeout * 2).await {
        Step::Ok(out) => Ok(out.trim().to_owned()),
        Step::Transient(e) | Step::Refused(e) => Err(e),
    }
}

/// Copies `artifact` to the device at `address` and installs it there.
pub async fn push(
    device_id: &str,
    address: &str,
    artifact: &Artifact,
    options: &SshOptions,
) -> Outcome {
    let (login, port) = match target(address) {
        Ok(t) => t,
        Err(error) => {
            return Outcome::Rejected {
                attempts: 0,
                status: 0,
                error,
            };
        }
    };
    let remote = format!(
        "{}/gantry-{}-{}.bin",
        options.remote_dir.trim_end_matches('/'),
        artifact.version,
        &artifact.sha256[..artifact.sha256.len().min(12)]
    );
    let install = options
        .install_command
        .replace("{path}", &quote(&remote))
        .replace("{version}", &quote(&artifact.version))
        .replace("{sha256}", &quote(&artifact.sha256))
        .replace("{signature}", &quote(&artifact.signature))
        .replace("{device}", &quote(device_id));
    let mut scp = common_args(options);
    // Not `-q`: it would silence ssh's own diagnostics, which say why a copy was refused.
    scp.extend([
        "-P".to_owned(),
        port.to_string(),
        artifact.path.display().to_string(),
        format!("{login}:{remote}"),
    ]);
    // A copy may take as long as the bytes need; give each step a generous bound.
    let limit = options.connect_timeout * 10 + Duration::from_secs(60);
    let started = Instant::now();
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let step = match run("scp", &scp, limit).await {
            Step::Ok(_) => run("ssh", &ssh_args(options, &login, port, &install), limit).await,
            other => other,
        };
        match step {
            Step::Ok(_) => break,
            Step::Refused(error) => {
                return Outcome::Rejected {
                    attempts,
                    status: 0,
                    error,
                };
            }
            Step::Transient(error) => match options.retry.next_delay(attempts) {
                Some(delay) => tokio::time::sleep(delay).await,
                None => return Outcome::Failed { attempts, error },
            },
        }
    }
    let push_ms = millis(started.elapsed());
    let gate_started = Instant::now();
    if options.version_command.is_some() {
        let deadline = gate_started + options.gate_timeout;
        loop {
            let seen = match version(address, options).await {
                Ok(v) if v == artifact.version => break,
                Ok(v) => format!("the device reports version {v:?}"),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                return Outcome::Unhealthy {
                    attempts,
                    reason: seen,
                };
            }
            tokio::time::sleep(options.gate_interval).await;
        }
    }
    Outcome::Delivered {
        attempts,
        push_ms,
        verify_ms: millis(gate_started.elapsed()),
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_quoting() {
        assert_eq!(
            target("pos@10.0.0.5:2222").unwrap(),
            ("pos@10.0.0.5".into(), 2222)
        );
        assert_eq!(target("10.0.0.5").unwrap(), ("10.0.0.5".into(), 22));
        assert!(target("pos@:22").is_err());
        assert!(target("a b:22").is_err());
        assert!(target("h:port").is_err());
        assert_eq!(quote("it's"), "'it'\\''s'");
    }
}
