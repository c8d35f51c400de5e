//! `stoa storage`: list, copy and delete the files of the org's storage (what runs see
//! at `s3_mount_path`) through the API. A remote location is written `s3://KEY` or
//! `storage:KEY`; everything else is a local path.
//!
//! With `-r` a remote prefix names a folder: `data` covers `data` and `data/…`, never
//! `database.csv`, so a recursive delete never reaches past the folder it names.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use stoa_client::{Client, ClientError, StoredFile};

/// Transfers bigger than this get a progress bar.
const BAR_FROM: u64 = 1024 * 1024;

#[derive(Subcommand)]
pub enum StorageCommand {
    /// List stored files (all, or those whose key starts with PREFIX).
    Ls {
        /// Key prefix (bare, `s3://PREFIX` or `storage:PREFIX`).
        prefix: Option<String>,
        /// Print the list as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Copy files to or from storage; the remote side is `s3://KEY` or `storage:KEY`.
    Cp {
        /// Local path, or `s3://KEY`.
        src: String,
        /// Local path, or `s3://KEY` (a key ending in '/' gets the file's name).
        dst: String,
        /// Copy a local directory, or every key under a remote prefix.
        #[arg(short, long)]
        recursive: bool,
        /// No progress bars.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Delete a stored file, or with -r every file under a prefix.
    Rm {
        /// Key (bare, `s3://KEY` or `storage:KEY`).
        key: String,
        /// Delete every file under the prefix KEY.
        #[arg(short, long)]
        recursive: bool,
    },
}

pub async fn run(cmd: StorageCommand) -> anyhow::Result<i32> {
    // Bad arguments are refused before anything is sent, or a login is even needed.
    match cmd {
        StorageCommand::Ls { prefix, json } => {
            let prefix = prefix.as_deref().map(key_arg).unwrap_or("");
            let c = crate::login::client()?;
            let files = c.storage_list(prefix).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&files)?);
            } else if files.is_empty() {
                eprintln!("no files");
            } else {
                let rows: Vec<Vec<String>> = files
                    .iter()
                    .map(|f| vec![f.key.clone(), human(f.size), f.last_modified.clone()])
                    .collect();
                crate::jobs::print_table(&["KEY", "SIZE", "LAST MODIFIED"], &rows);
            }
            Ok(0)
        }
        StorageCommand::Cp {
            src,
            dst,
            recursive,
            quiet,
        } => match (remote(&src), remote(&dst)) {
            (None, None) => bail!(
                "neither {src:?} nor {dst:?} is in storage: write the remote side as s3://KEY or storage:KEY"
            ),
            (Some(_), Some(_)) => {
                bail!("both sides are in storage: one side of `stoa storage cp` must be local")
            }
            (None, Some(key)) => upload(Path::new(&src), key, recursive, quiet).await,
            (Some(key), None) => download(key, &dst, recursive, quiet).await,
        },
        StorageCommand::Rm { key, recursive } => remove(key_arg(&key), recursive).await,
    }
}

/// The key of a remote location (`s3://KEY` or `storage:KEY`), `None` for a local path.
fn remote(arg: &str) -> Option<&str> {
    arg.strip_prefix("s3://")
        .or_else(|| arg.strip_prefix("storage:"))
        .map(|k| k.trim_start_matches('/'))
}

/// A key given where only a key fits: bare or written as a remote location.
fn key_arg(arg: &str) -> &str {
    remote(arg).unwrap_or(arg)
}

/// The files `dir` names as a folder: itself, and those under `dir/` (all when empty).
async fn under(c: &Client, dir: &str) -> anyhow::Result<Vec<StoredFile>> {
    let files = c.storage_list(dir).await?;
    Ok(files
        .into_iter()
        .filter(|f| {
            dir.is_empty()
                || f.key == dir
                || f.key.strip_prefix(dir).is_some_and(|r| r.starts_with('/'))
        })
        .collect())
}

/// The files in the folder `dir`, or `None` (said) when there are none.
async fn some_under(c: &Client, dir: &str) -> anyhow::Result<Option<Vec<StoredFile>>> {
    let files = under(c, dir).await?;
    if files.is_empty() {
        eprintln!("no files in storage under s3://{dir}");
        return Ok(None);
    }
    Ok(Some(files))
}

/// Whether an error is the server's 404.
fn not_found(e: &anyhow::Error) -> bool {
    e.downcast_ref::<ClientError>()
        .and_then(ClientError::status)
        == Some(404)
}

async fn upload(src: &Path, dst: &str, recursive: bool, quiet: bool) -> anyhow::Result<i32> {
    let meta = match std::fs::metadata(src) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("no such file or directory: {}", src.display())
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", src.display())),
    };
    if meta.is_file() {
        let key = if dst.is_empty() || dst.ends_with('/') {
            let name = src
                .file_name()
                .and_then(|n| n.to_str())
                .with_context(|| format!("{} has no UTF-8 file name", src.display()))?;
            format!("{dst}{name}")
        } else {
            dst.to_string()
        };
        let c = crate::login::client()?;
        upload_one(&c, src, &key, quiet).await?;
        return Ok(0);
    }
    if !meta.is_dir() {
        bail!("{} is not a regular file or a directory", src.display());
    }
    if !recursive {
        bail!("{} is a directory: pass -r to copy it", src.display());
    }
    // Walked in full first: a name that cannot be a key stops the copy before it starts.
    let files = local_files(src)?;
    if files.is_empty() {
        println!("no files under {}: nothing uploaded", src.display());
        return Ok(0);
    }
    let base = dst.trim_end_matches('/');
    let c = crate::login::client()?;
    let mut total = 0;
    for (path, rel) in &files {
        let key = if base.is_empty() {
            rel.clone()
        } else {
            format!("{base}/{rel}")
        };
        total += upload_one(&c, path, &key, quiet).await?;
    }
    println!("uploaded {} ({})", files_n(files.len()), human(total));
    Ok(0)
}

/// The regular files below `dir` (a link to a file counts as the file; links to
/// directories are not followed), with their paths relative to `dir` in '/' form,
/// sorted.
fn local_files(dir: &Path) -> anyhow::Result<Vec<(PathBuf, String)>> {
    let mut out = Vec::new();
    let mut todo = vec![(dir.to_path_buf(), String::new())];
    while let Some((d, rel)) = todo.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let e = e.with_context(|| format!("reading {}", d.display()))?;
            let path = e.path();
            let Ok(name) = e.file_name().into_string() else {
                bail!("{} is not a UTF-8 name: it cannot be a key", path.display());
            };
            let rel = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let ty = e.file_type()?;
            if ty.is_dir() {
                todo.push((path, rel));
            } else if ty.is_file()
                || (ty.is_symlink() && path.metadata().is_ok_and(|m| m.is_file()))
            {
                out.push((path, rel));
            } else {
                eprintln!(
                    "skipping {}: not a regular file or directory",
                    path.display()
                );
            }
        }
    }
    out.sort_by(|a, b| a.1.cmp(&b.1));
    Ok(out)
}

async fn upload_one(c: &Client, path: &Path, key: &str, quiet: bool) -> anyhow::Result<u64> {
    let size = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    let pb = bar(Some(size), &path.display().to_string(), quiet);
    let shown = pb.clone();
    let res = c
        .storage_upload(key, path, move |done, _| {
            if let Some(b) = &shown {
                b.set_position(done);
            }
        })
        .await;
    if let Some(b) = pb {
        b.finish_and_clear();
    }
    let f = res.with_context(|| format!("uploading {} to s3://{key}", path.display()))?;
    println!(
        "uploaded {} to s3://{} ({})",
        path.display(),
        f.key,
        human(f.size)
    );
    Ok(f.size)
}

async fn download(key: &str, dst: &str, recursive: bool, quiet: bool) -> anyhow::Result<i32> {
    if dst.is_empty() {
        bail!("the destination is empty: name a file or directory");
    }
    if !recursive {
        if key.is_empty() || key.ends_with('/') {
            bail!("s3://{key} names a folder: pass -r to copy what is under it");
        }
        let target = if dst.ends_with('/') || Path::new(dst).is_dir() {
            let name = key.rsplit('/').next().unwrap_or(key);
            Path::new(dst).join(name)
        } else {
            PathBuf::from(dst)
        };
        let c = crate::login::client()?;
        if dst.ends_with('/') {
            std::fs::create_dir_all(dst).with_context(|| format!("creating {dst}"))?;
        }
        return match download_one(&c, key, &target, quiet).await {
            Ok(_) => Ok(0),
            Err(e) if not_found(&e) => {
                eprintln!("no such file in storage: s3://{key}");
                Ok(1)
            }
            Err(e) => Err(e.context(format!("downloading s3://{key}"))),
        };
    }
    let dir = key.trim_end_matches('/');
    let c = crate::login::client()?;
    let Some(files) = some_under(&c, dir).await? else {
        return Ok(1);
    };
    // Keys come from the server: each is checked to stay below `dst` before any is written.
    let mut plan = Vec::with_capacity(files.len());
    for f in files {
        let rel = if dir.is_empty() {
            f.key.as_str()
        } else if f.key == dir {
            dir.rsplit('/').next().unwrap_or(dir)
        } else {
            &f.key[dir.len() + 1..]
        };
        if rel
            .split('/')
            .any(|p| p.is_empty() || p == "." || p == "..")
        {
            bail!("refusing to write the key {:?} outside {dst}", f.key);
        }
        let target = Path::new(dst).join(rel);
        plan.push((f.key, target));
    }
    let mut total = 0;
    for (key, target) in &plan {
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        total += download_one(&c, key, target, quiet)
            .await
            .with_context(|| format!("downloading s3://{key}"))?;
    }
    println!("downloaded {} ({})", files_n(plan.len()), human(total));
    Ok(0)
}

/// A file that is removed when dropped, unless kept.
struct Partial(Option<PathBuf>);

impl Drop for Partial {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Downloads `key` to `target`: written to a file beside it, renamed into place once
/// complete, so a failed or interrupted download never leaves a torn file (nor
/// replaces one that was there).
async fn download_one(c: &Client, key: &str, target: &Path, quiet: bool) -> anyhow::Result<u64> {
    let name = target
        .file_name()
        .with_context(|| format!("{} has no file name", target.display()))?;
    let part = target.with_file_name(format!(
        ".{}.stoa-part-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let mut file = tokio::fs::File::create(&part)
        .await
        .with_context(|| format!("creating {}", part.display()))?;
    let mut partial = Partial(Some(part.clone()));
    let mut pb: Option<ProgressBar> = None;
    let res = {
        let download = c.storage_download(key, &mut file, |done, total| {
            if done == 0 {
                pb = bar(total, key, quiet);
            }
            if let Some(b) = &pb {
                b.set_position(done);
            }
        });
        tokio::select! {
            r = download => Some(r),
            _ = tokio::signal::ctrl_c() => None,
        }
    };
    if let Some(b) = &pb {
        b.finish_and_clear();
    }
    let Some(res) = res else {
        drop(file);
        drop(partial);
        eprintln!("interrupted: {} not written", target.display());
        std::process::exit(130);
    };
    let n = res?;
    drop(file);
    tokio::fs::rename(&part, target)
        .await
        .with_context(|| format!("writing {}", target.display()))?;
    partial.0 = None;
    println!(
        "downloaded s3://{key} to {} ({})",
        target.display(),
        human(n)
    );
    Ok(n)
}

async fn remove(key: &str, recursive: bool) -> anyhow::Result<i32> {
    if !recursive {
        if key.is_empty() || key.ends_with('/') {
            bail!("s3://{key} names a folder: pass -r to delete what is under it");
        }
        let c = crate::login::client()?;
        return match c.storage_delete(key).await {
            Ok(()) => {
                println!("removed s3://{key}");
                Ok(0)
            }
            Err(e) if e.status() == Some(404) => {
                eprintln!("no such file in storage: s3://{key}");
                Ok(1)
            }
            Err(e) => Err(e.into()),
        };
    }
    let dir = key.trim_end_matches('/');
    let c = crate::login::client()?;
    let Some(files) = some_under(&c, dir).await? else {
        return Ok(1);
    };
    let mut removed = 0;
    for f in &files {
        match c.storage_delete(&f.key).await {
            Ok(()) => removed += 1,
            // Deleted meanwhile by someone else: what was asked for is done.
            Err(e) if e.status() == Some(404) => {}
            Err(e) => {
                return Err(anyhow::Error::from(e).context(format!("removing s3://{}", f.key)));
            }
        }
    }
    println!("removed {} under s3://{dir}", files_n(removed));
    Ok(0)
}

/// A progress bar on stderr for a transfer of `total` bytes, when one is worth drawing:
/// stderr is a terminal, the transfer is over 1 MiB and `--quiet` was not given.
fn bar(total: Option<u64>, label: &str, quiet: bool) -> Option<ProgressBar> {
    let total = total?;
    if quiet || total <= BAR_FROM || !std::io::stderr().is_terminal() {
        return None;
    }
    let style = ProgressStyle::with_template(
        "{msg} [{bar:30}] {decimal_bytes}/{decimal_total_bytes} {decimal_bytes_per_sec} eta {eta}",
    )
    .expect("the template is valid")
    .progress_chars("=> ");
    Some(
        ProgressBar::new(total)
            .with_style(style)
            .with_message(label.to_string()),
    )
}

/// `n files`, or `1 file`.
fn files_n(n: usize) -> String {
    if n == 1 {
        "1 file".into()
    } else {
        format!("{n} files")
    }
}

/// `bytes` in decimal units: `512 B`, `47.7 MB`.
fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["kB", "MB", "GB", "TB", "PB", "EB"];
    if bytes < 1000 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1000.0;
    let mut unit = 0;
    // 999.95 would print as "1000.0": move up a unit instead.
    while v >= 999.95 && unit + 1 < UNITS.len() {
        v /= 1000.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_locations() {
        assert_eq!(remote("s3://data/x.bin"), Some("data/x.bin"));
        assert_eq!(remote("storage:data/x.bin"), Some("data/x.bin"));
        assert_eq!(remote("s3://"), Some(""));
        assert_eq!(remote("./s3/x"), None);
        assert_eq!(key_arg("data/"), "data/");
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(0), "0 B");
        assert_eq!(human(999), "999 B");
        assert_eq!(human(1000), "1.0 kB");
        assert_eq!(human(47_700_000), "47.7 MB");
        assert_eq!(human(999_999), "1.0 MB");
    }
}
