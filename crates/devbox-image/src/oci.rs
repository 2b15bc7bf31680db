//! OCI image layouts and `docker save` archives (already unpacked into a directory).
//!
//! Every blob read is checked against its sha256 digest; layers are applied in order, with
//! whiteouts, into one flattened root.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::extract::{self, ExtractOptions};
use crate::{ImageConfig, ImageError};

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    platform: Option<Platform>,
    #[serde(default)]
    annotations: std::collections::BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct Platform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
}

#[derive(Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Manifest {
    config: Descriptor,
    layers: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct DockerManifestEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

#[derive(Deserialize, Default)]
struct ConfigFile {
    #[serde(default)]
    config: Option<RunConfig>,
    #[serde(default)]
    rootfs: Option<RootfsIds>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct RunConfig {
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
}

#[derive(Deserialize, Default)]
struct RootfsIds {
    #[serde(default)]
    diff_ids: Vec<String>,
}

/// What reading an image layout produced.
pub struct Unpacked {
    /// sha256 hex of the image config: the image's id.
    pub id: String,
    /// A name found in the archive (`busybox:latest`).
    pub name: Option<String>,
    /// Run settings.
    pub config: ImageConfig,
}

fn blob_path(layout: &Path, digest: &str) -> Result<PathBuf, ImageError> {
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| {
            ImageError::Format(format!(
                "unsupported digest {digest:?} (only sha256 is supported)"
            ))
        })?;
    Ok(layout.join("blobs/sha256").join(hex))
}

fn read_verified(path: &Path, digest: &str) -> Result<Vec<u8>, ImageError> {
    let data =
        std::fs::read(path).map_err(|e| ImageError::io("read", &path.display().to_string(), e))?;
    let got = format!("sha256:{}", hex::encode(Sha256::digest(&data)));
    if got != digest {
        return Err(ImageError::Corrupt(format!(
            "{} does not match its digest {digest}",
            path.display()
        )));
    }
    Ok(data)
}

/// A reader that hashes what passes through it.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Applies one layer file after checking the digest of its raw bytes (`blob_digest`), and
/// checks the digest of its uncompressed tar stream (`diff_id`) on the way.
fn apply_layer(
    path: &Path,
    blob_digest: Option<&str>,
    diff_id: Option<&str>,
    root: &Path,
) -> Result<(), ImageError> {
    let shown = path.display().to_string();
    let open = || File::open(path).map_err(|e| ImageError::io("open", &shown, e));
    if let Some(want) = blob_digest {
        let mut hashing = Hashing {
            inner: open()?,
            hasher: Sha256::new(),
        };
        io::copy(&mut hashing, &mut io::sink()).map_err(|e| ImageError::io("read", &shown, e))?;
        if format!("sha256:{}", hex::encode(hashing.hasher.finalize())) != want {
            return Err(ImageError::Corrupt(format!(
                "layer {shown} does not match its digest {want}"
            )));
        }
    }
    let mut tar_stream = Hashing {
        inner: extract::decompressed(open()?)?,
        hasher: Sha256::new(),
    };
    extract::extract(
        &mut tar_stream,
        root,
        ExtractOptions {
            whiteouts: true,
            ..Default::default()
        },
    )?;
    // Drain the end-of-archive padding so the digest covers the whole stream.
    io::copy(&mut tar_stream, &mut io::sink()).map_err(|e| ImageError::io("read", &shown, e))?;
    if let Some(want) = diff_id
        && format!("sha256:{}", hex::encode(tar_stream.hasher.finalize())) != want
    {
        return Err(ImageError::Corrupt(format!(
            "layer {shown} does not match its diff id {want}"
        )));
    }
    Ok(())
}

fn run_config(cfg: ConfigFile) -> ImageConfig {
    let rc = cfg.config.unwrap_or_default();
    ImageConfig {
        env: rc.env.unwrap_or_default(),
        workdir: rc.working_dir.filter(|w| !w.is_empty()),
        user: rc.user.filter(|u| !u.is_empty()),
        entrypoint: rc.entrypoint.unwrap_or_default(),
        cmd: rc.cmd.unwrap_or_default(),
    }
}

/// Reads an OCI image layout directory and flattens its image into `root`.
pub fn unpack_oci_layout(layout: &Path, root: &Path) -> Result<Unpacked, ImageError> {
    let index: Index = serde_json::from_slice(
        &std::fs::read(layout.join("index.json"))
            .map_err(|e| ImageError::io("read", "index.json", e))?,
    )
    .map_err(|e| ImageError::Format(format!("index.json: {e}")))?;
    let mut desc = pick(index.manifests, "index.json")?;
    let mut name = desc
        .annotations
        .get("org.opencontainers.image.ref.name")
        .cloned();
    // Follow nested indexes to a linux/amd64 manifest.
    for _ in 0..4 {
        if !desc.media_type.contains("index") && !desc.media_type.contains("manifest.list") {
            break;
        }
        let data = read_verified(&blob_path(layout, &desc.digest)?, &desc.digest)?;
        let inner: Index = serde_json::from_slice(&data)
            .map_err(|e| ImageError::Format(format!("image index: {e}")))?;
        desc = pick(inner.manifests, "image index")?;
        if name.is_none() {
            name = desc
                .annotations
                .get("org.opencontainers.image.ref.name")
                .cloned();
        }
    }
    let data = read_verified(&blob_path(layout, &desc.digest)?, &desc.digest)?;
    let manifest: Manifest = serde_json::from_slice(&data)
        .map_err(|e| ImageError::Format(format!("image manifest: {e}")))?;
    let config_bytes = read_verified(
        &blob_path(layout, &manifest.config.digest)?,
        &manifest.config.digest,
    )?;
    let config: ConfigFile = serde_json::from_slice(&config_bytes)
        .map_err(|e| ImageError::Format(format!("image config: {e}")))?;
    let diff_ids = config
        .rootfs
        .as_ref()
        .map(|r| r.diff_ids.clone())
        .unwrap_or_default();
    for (i, layer) in manifest.layers.iter().enumerate() {
        apply_layer(
            &blob_path(layout, &layer.digest)?,
            Some(&layer.digest),
            diff_ids.get(i).map(String::as_str),
            root,
        )?;
    }
    let id = manifest
        .config
        .digest
        .trim_start_matches("sha256:")
        .to_string();
    Ok(Unpacked {
        id,
        name,
        config: run_config(config),
    })
}

fn pick(manifests: Vec<Descriptor>, what: &str) -> Result<Descriptor, ImageError> {
    let mut best = None;
    for m in manifests {
        let plat_ok = m
            .platform
            .as_ref()
            .map(|p| p.os == "linux" && p.architecture == "amd64")
            .unwrap_or(true);
        if plat_ok && best.is_none() {
            best = Some(m);
        }
    }
    best.ok_or_else(|| ImageError::Format(format!("{what} lists no linux/amd64 image")))
}

/// Reads an unpacked `docker save` archive and flattens its (first) image into `root`.
pub fn unpack_docker_save(dir: &Path, root: &Path) -> Result<Unpacked, ImageError> {
    let entries: Vec<DockerManifestEntry> = serde_json::from_slice(
        &std::fs::read(dir.join("manifest.json"))
            .map_err(|e| ImageError::io("read", "manifest.json", e))?,
    )
    .map_err(|e| ImageError::Format(format!("manifest.json: {e}")))?;
    let entry = entries
        .into_iter()
        .next()
        .ok_or_else(|| ImageError::Format("manifest.json lists no image".into()))?;
    let config_rel = extract::clean_path(Path::new(&entry.config))?;
    let config_bytes = std::fs::read(dir.join(&config_rel))
        .map_err(|e| ImageError::io("read", &entry.config, e))?;
    let id = hex::encode(Sha256::digest(&config_bytes));
    // The config's file name is its digest; check it when it says so.
    let stem = config_rel
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("")
        .trim_end_matches(".json")
        .to_string();
    if stem.len() == 64 && stem != id {
        return Err(ImageError::Corrupt(format!(
            "{} does not match its digest",
            entry.config
        )));
    }
    let config: ConfigFile = serde_json::from_slice(&config_bytes)
        .map_err(|e| ImageError::Format(format!("image config: {e}")))?;
    let diff_ids = config
        .rootfs
        .as_ref()
        .map(|r| r.diff_ids.clone())
        .unwrap_or_default();
    if !diff_ids.is_empty() && diff_ids.len() != entry.layers.len() {
        return Err(ImageError::Corrupt(
            "the image config and manifest.json disagree on the number of layers".into(),
        ));
    }
    for (i, layer) in entry.layers.iter().enumerate() {
        let rel = extract::clean_path(Path::new(layer))?;
        let blob = rel
            .strip_prefix("blobs/sha256")
            .ok()
            .and_then(|p| p.to_str())
            .map(|h| format!("sha256:{h}"));
        apply_layer(
            &dir.join(&rel),
            blob.as_deref(),
            diff_ids.get(i).map(String::as_str),
            root,
        )?;
    }
    let name = entry.repo_tags.and_then(|t| t.into_iter().next());
    Ok(Unpacked {
        id,
        name,
        config: run_config(config),
    })
}
