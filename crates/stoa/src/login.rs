//! The client's saved login: `~/.stoa/config.json`, overridden by `STOA_URL` and
//! `STOA_API_KEY`.

use std::path::PathBuf;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use stoa_client::Client;

/// What `stoa login` saves.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Login {
    pub url: String,
    pub api_key: String,
}

fn path() -> anyhow::Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    Ok(PathBuf::from(home).join(".stoa").join("config.json"))
}

/// The client for the saved login (environment variables win).
pub fn client() -> anyhow::Result<Client> {
    let saved: Option<Login> = path()
        .ok()
        .and_then(|p| std::fs::read(p).ok())
        .and_then(|b| serde_json::from_slice(&b).ok());
    let url = std::env::var("STOA_URL")
        .ok()
        .or_else(|| saved.as_ref().map(|s| s.url.clone()));
    let key = std::env::var("STOA_API_KEY")
        .ok()
        .or_else(|| saved.as_ref().map(|s| s.api_key.clone()));
    match (url, key) {
        (Some(u), Some(k)) => Ok(Client::new(&u, &k)),
        _ => anyhow::bail!(
            "not logged in: run `stoa login --url URL --api-key KEY` (or set STOA_URL and STOA_API_KEY)"
        ),
    }
}

/// Checks the key against the server, then saves it.
pub async fn login(url: &str, key: &str) -> anyhow::Result<i32> {
    let c = Client::new(url, key);
    let org = c.user_org().await.context("checking the API key")?;
    let p = path()?;
    std::fs::create_dir_all(p.parent().expect("has a parent"))?;
    let text = serde_json::to_string_pretty(&Login {
        url: url.trim_end_matches('/').to_string(),
        api_key: key.to_string(),
    })?;
    stoa_server::auth::write_private(&p, &text)?;
    println!("Logged in to {url} as org {} ({})", org.slug, org.org_id);
    Ok(0)
}
