//! `stoa env`, `stoa secrets` and `stoa callbacks`: secrets and callback signing.

use clap::Subcommand;

#[derive(Subcommand)]
pub enum EnvCommand {
    /// Set a variable (encrypted at rest, injected into every run, masked in output).
    Set { name: String, value: String },
    /// List variable names (values are never shown).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove one variable, or all of them.
    Rm {
        name: Option<String>,
        #[arg(long)]
        all: bool,
    },
}

#[derive(Subcommand)]
pub enum SecretsCommand {
    /// Re-encrypt every secret under a new master key (DATA_DIR/master.key).
    RotateKey {
        #[command(flatten)]
        data: crate::DataDir,
    },
}

#[derive(Subcommand)]
pub enum CallbacksCommand {
    /// Show the org's callback signing secret (or replace it with --rotate).
    Secret {
        #[arg(long)]
        rotate: bool,
    },
}

pub async fn env(cmd: EnvCommand) -> anyhow::Result<i32> {
    let c = crate::login::client()?;
    match cmd {
        EnvCommand::Set { name, value } => {
            c.env_set(&[(&name, &value)]).await?;
            println!("set {name}");
        }
        EnvCommand::List { json } => {
            let v = c.env_list().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let rows: Vec<Vec<String>> = v["environment_variables"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|e| {
                        vec![
                            e["name"].as_str().unwrap_or("").to_string(),
                            e["id"].as_str().unwrap_or("").to_string(),
                            e["updated_at"].as_str().unwrap_or("").to_string(),
                        ]
                    })
                    .collect();
                crate::jobs::print_table(&["NAME", "ID", "UPDATED"], &rows);
            }
        }
        EnvCommand::Rm { name, all } => match (name, all) {
            (_, true) => {
                let v = c.env_rm_all().await?;
                println!("{}", v["message"].as_str().unwrap_or("deleted"));
            }
            (Some(n), false) => {
                c.env_rm(&n).await?;
                println!("removed {n}");
            }
            (None, false) => anyhow::bail!("name a variable to remove, or pass --all"),
        },
    }
    Ok(0)
}

pub async fn secrets(cmd: SecretsCommand) -> anyhow::Result<i32> {
    match cmd {
        SecretsCommand::RotateKey { data } => {
            let store = crate::keys::open_store(&data).await?;
            let (old, new, n) =
                stoa_server::secrets::rotate(&data.data_dir, store.as_ref()).await?;
            println!("rotated the master key {old} → {new}; re-encrypted {n} values");
        }
    }
    Ok(0)
}

pub async fn callbacks(cmd: CallbacksCommand) -> anyhow::Result<i32> {
    let c = crate::login::client()?;
    match cmd {
        CallbacksCommand::Secret { rotate } => {
            let v = c.callback_secret(rotate).await?;
            println!("{}", v["signing_secret"].as_str().unwrap_or(""));
            eprintln!("{}", v["header"].as_str().unwrap_or(""));
        }
    }
    Ok(0)
}
