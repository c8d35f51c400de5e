//! `stoa keys`: API keys and orgs, managed on the server's data directory.

use std::sync::Arc;
use stoa_store::prelude::*;

use anyhow::Context;
use clap::Subcommand;
use stoa_server::auth::{generate_key, key_record};

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Create a key; for an org that does not exist yet, the org is created (a new tenant).
    Create {
        /// Org slug.
        #[arg(long, default_value = "default")]
        org: String,
        /// A name for the key.
        #[arg(long, default_value = "cli")]
        name: String,
        /// Make it an admin key.
        #[arg(long)]
        admin: bool,
    },
    /// List keys (never their secrets).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key by id or prefix.
    Revoke { id: String },
}

/// The server's store (which must exist: a SQLite one is never made here).
pub async fn open_store(data: &crate::DataDir) -> anyhow::Result<Arc<dyn Store>> {
    let at = data.location();
    if let stoa_store::Location::Sqlite(db) = &at
        && !db.exists()
    {
        anyhow::bail!(
            "no Stoa database at {} (start `stoa server` once, or pass --data-dir or --database-url)",
            db.display()
        );
    }
    Ok(stoa_store::open(&at)
        .await
        .with_context(|| format!("opening the store at {}", at.display()))?
        .store)
}

pub async fn run(data: &crate::DataDir, cmd: KeysCommand) -> anyhow::Result<i32> {
    let store = open_store(data).await?;
    match cmd {
        KeysCommand::Create { org, name, admin } => {
            let o = match store.find_org(&org).await? {
                Some(o) => o,
                None => {
                    let o = store.create_org(&org, &org).await?;
                    eprintln!("created org {} ({})", o.slug, o.id);
                    o
                }
            };
            let secret = generate_key();
            store
                .insert_key(&key_record(&secret, &o, &name, admin))
                .await?;
            eprintln!("API key for org {} (shown once):", o.slug);
            println!("{secret}");
        }
        KeysCommand::List { json } => {
            let orgs = store.list_orgs().await?;
            let keys = store.list_keys().await?;
            let slug = |id: &stoa_types::OrgId| {
                orgs.iter()
                    .find(|o| &o.id == id)
                    .map(|o| o.slug.clone())
                    .unwrap_or_default()
            };
            if json {
                let v: Vec<_> = keys
                    .iter()
                    .map(|k| serde_json::json!({"id": k.id, "org": slug(&k.org_id), "key_name": k.name, "key_prefix": k.prefix, "is_active": k.is_active, "is_admin": k.is_admin, "created_at": k.created_at, "last_used_at": k.last_used_at}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let rows: Vec<Vec<String>> = keys
                    .iter()
                    .map(|k| {
                        vec![
                            k.id.clone(),
                            slug(&k.org_id),
                            k.name.clone(),
                            format!("{}…", k.prefix),
                            if k.is_active { "active" } else { "revoked" }.into(),
                            if k.is_admin { "admin" } else { "" }.into(),
                            k.last_used_at
                                .as_ref()
                                .map_or_else(|| "never".into(), stoa_core::time::stamp),
                        ]
                    })
                    .collect();
                crate::jobs::print_table(
                    &["ID", "ORG", "NAME", "PREFIX", "STATE", "ROLE", "LAST USED"],
                    &rows,
                );
            }
        }
        KeysCommand::Revoke { id } => {
            if !store.revoke_key(&id).await? {
                anyhow::bail!("no active key with id or prefix {id:?}");
            }
            println!("revoked {id}");
        }
    }
    Ok(0)
}
