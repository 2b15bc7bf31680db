//! `sandbox token create|ls|revoke`: API tokens for callers over TCP.

use anyhow::bail;
use devbox_client::Client;
use devbox_wire::{CreateTokenRequest, Scope};

use crate::cli::{Format, TokenCommand};
use crate::commands::print_json;
use crate::output;

/// Runs a token command; returns the exit code.
pub async fn command(c: &Client, cmd: &TokenCommand) -> anyhow::Result<i32> {
    match cmd {
        TokenCommand::Create {
            name,
            scope,
            sandbox,
            expires,
            rate,
            max_execs,
            format,
        } => {
            let scopes = Scope::parse_list(scope).map_err(|e| anyhow::anyhow!("--scope: {e}"))?;
            let expires_in_seconds = match expires {
                Some(e) => {
                    let ms = devbox_spec::quantity::parse_duration_ms(e)
                        .map_err(|err| anyhow::anyhow!("--expires: {err}"))?;
                    if ms < 1000 {
                        bail!("--expires: give at least a second (30d, 12h, 90m)");
                    }
                    Some(ms / 1000)
                }
                None => None,
            };
            let made = c
                .create_token(&CreateTokenRequest {
                    name: name.clone(),
                    scopes,
                    sandbox: sandbox.clone(),
                    expires_in_seconds,
                    rate_per_second: *rate,
                    max_execs: *max_execs,
                })
                .await?;
            if *format == Format::Json {
                print_json(&made)?;
            } else {
                println!("{}", made.token);
                eprintln!(
                    "token {:?} made: it is shown this once; give it as DEVBOX_TOKEN (or --token) with DEVBOX_HOST",
                    made.info.name
                );
            }
        }
        TokenCommand::Ls { format } => {
            let tokens = c.tokens().await?;
            if *format == Format::Json {
                print_json(&tokens)?;
            } else {
                let rows: Vec<Vec<String>> = tokens
                    .iter()
                    .map(|t| {
                        vec![
                            t.name.clone(),
                            t.scopes
                                .iter()
                                .map(|s| s.as_str())
                                .collect::<Vec<_>>()
                                .join(","),
                            t.sandbox.clone().unwrap_or_else(|| "*".into()),
                            match (&t.expires_at, t.expired) {
                                (_, true) => "expired".into(),
                                (Some(e), false) => e.clone(),
                                (None, false) => "never".into(),
                            },
                            t.last_used_at
                                .as_deref()
                                .map_or_else(|| "never".into(), output::ago),
                            t.created_by.clone(),
                        ]
                    })
                    .collect();
                output::table(
                    &[
                        "NAME",
                        "SCOPES",
                        "SANDBOXES",
                        "EXPIRES",
                        "LAST USED",
                        "CREATED BY",
                    ],
                    &rows,
                );
            }
        }
        TokenCommand::Revoke { names } => {
            for n in names {
                c.revoke_token(n).await?;
                println!("{n}");
            }
        }
    }
    Ok(0)
}
