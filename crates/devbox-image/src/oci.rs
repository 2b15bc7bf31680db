//! OCI image layouts and `docker save` archives.
//!
//! An image's members (index, manifests, config, layers) are read through [`Members`]: from
//! a directory opened once, each member opened beneath it with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV)` and required to be a
//! regular file with one link ([`DirMembers`]); or from an archive's tar stream, each regular
//! member staged under a name the daemon makes up ([`StagedArchive`]), so no name from the
//! archive is ever joined to a path. A symlink or hard link member of an archive is only an
//! alias of another member of the same archive, looked up by name in the table read from
//! the stream; a link to an absolute path, one that leaves the archive, or a member reached
//! through a linked directory is refused.
//!
//! Every byte is verified: manifests and configs against the digests that name them, each
//! layer's raw bytes against its blob digest (when it is a blob) and its uncompressed tar
//! stream against the config's `rootfs.diff_ids` entry at its position; the layer and
//! diff-id counts must match. An OCI descriptor's size is checked against the blob's before
//! the blob is read; a docker config named by a digest must match it, and the image's id is
//! the digest of the config's bytes whatever it is named. An image whose config lists no diff ids is refused: nothing
//! would vouch for its layers. So the image's id, the config's digest, names exactly the
//! content stored.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{FileType, Mode, OFlags, ResolveFlags};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::extract::{self, Budget, ExtractOptions};
use crate::{Hashing, ImageConfig, ImageError};

/// Largest index, manifest or config read.
const MAX_JSON: u64 = 16 << 20;
/// Most links followed from one member name to another.
const MAX_ALIASES: usize = 16;

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    size: Option<u64>,
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

fn hostile(entry: &str, why: impl std::fmt::Display) -> ImageError {
    ImageError::Hostile {
        entry: entry.to_string(),
        reason: why.to_string(),
    }
}

/// Where an image's members are read from.
pub(crate) trait Members {
    /// Opens member `name` (a relative path in the layout) for reading.
    fn open(&self, name: &str) -> Result<File, ImageError>;
}

const MEMBER_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::NOFOLLOW)
    .union(OFlags::NONBLOCK)
    .union(OFlags::NOCTTY)
    .union(OFlags::CLOEXEC);

fn no_links() -> ResolveFlags {
    ResolveFlags::BENEATH
        | ResolveFlags::NO_SYMLINKS
        | ResolveFlags::NO_MAGICLINKS
        | ResolveFlags::NO_XDEV
}

/// Members of a layout directory on this host.
pub(crate) struct DirMembers {
    dir: OwnedFd,
}

impl DirMembers {
    /// Opens the layout directory `path` (the caller's own choice of path).
    pub(crate) fn open_dir(path: &Path) -> Result<Self, ImageError> {
        let dir = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| ImageError::io("open", &path.display().to_string(), e.into()))?;
        Ok(Self { dir })
    }
}

impl Members for DirMembers {
    fn open(&self, name: &str) -> Result<File, ImageError> {
        let rel = extract::clean_path(Path::new(name))?;
        if rel.as_os_str().is_empty() {
            return Err(ImageError::Format(format!("{name:?} names no file")));
        }
        let fd = rustix::fs::openat2(&self.dir, &rel, MEMBER_FLAGS, Mode::empty(), no_links())
            .map_err(|e| match e {
                rustix::io::Errno::LOOP => hostile(
                    name,
                    "it is a symlink, or is reached through one: dev-box never follows links in an image layout",
                ),
                rustix::io::Errno::XDEV => hostile(name, "it lies outside the layout"),
                rustix::io::Errno::NOENT => {
                    ImageError::Format(format!("the layout has no {name}"))
                }
                other => ImageError::io("open", name, other.into()),
            })?;
        let st = rustix::fs::fstat(&fd).map_err(|e| ImageError::io("stat", name, e.into()))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(hostile(name, "it is not a regular file"));
        }
        if st.st_nlink > 1 {
            return Err(hostile(
                name,
                "it has other hard links (it could be a host file linked in): copy the layout without hard links",
            ));
        }
        Ok(File::from(fd))
    }
}

#[derive(Debug)]
enum Member {
    /// Staged as `m<N>` in the staging directory.
    File(u64),
    Symlink(PathBuf),
    HardLink(PathBuf),
    Directory,
    Other(&'static str),
}

/// Members of an image archive, read from its tar stream into a staging directory.
pub(crate) struct StagedArchive {
    dir: OwnedFd,
    table: HashMap<PathBuf, Member>,
}

impl StagedArchive {
    /// Reads the (decompressed) tar stream `reader`, staging each regular member's content
    /// into the empty directory `stage` (within `budget`) and recording every other member.
    pub(crate) fn read<R: Read>(
        reader: R,
        stage: &Path,
        budget: &mut Budget,
    ) -> Result<Self, ImageError> {
        let dir = rustix::fs::open(
            stage,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| ImageError::io("open", &stage.display().to_string(), e.into()))?;
        let mut table = HashMap::new();
        let mut archive = tar::Archive::new(extract::guarded_within(reader, budget));
        let entries = archive
            .entries()
            .map_err(|e| ImageError::Format(format!("not a tar archive: {e}")))?;
        let mut next = 0u64;
        let mut last: Option<String> = None;
        let refused = |e: io::Error, last: &Option<String>| match extract::refused_by_guard(&e) {
            Some(why) => hostile(last.as_deref().unwrap_or("(the first header)"), why),
            None => ImageError::Format(format!("corrupt tar archive: {e}")),
        };
        for entry in entries {
            let mut e = entry.map_err(|err| refused(err, &last))?;
            let kind = e.header().entry_type();
            let file_like =
                kind.is_file() || kind == tar::EntryType::Continuous || kind.is_gnu_sparse();
            // Names, link targets and data bounded before anything is kept or staged.
            let shown = extract::charge_entry(&mut e, budget, file_like)?;
            last = Some(shown.clone());
            let raw = e
                .path()
                .map_err(|err| {
                    ImageError::Format(format!("{shown}: unreadable entry name: {err}"))
                })?
                .into_owned();
            let path = extract::clean_path(&raw)?;
            if path.as_os_str().is_empty() {
                continue;
            }
            let link = || -> Result<PathBuf, ImageError> {
                Ok(e.link_name()
                    .map_err(|err| {
                        ImageError::Format(format!("{shown}: unreadable link target: {err}"))
                    })?
                    .ok_or_else(|| hostile(&shown, "a link without a target"))?
                    .into_owned())
            };
            let member = if file_like {
                let n = next;
                next += 1;
                let fd = rustix::fs::openat(
                    &dir,
                    format!("m{n}"),
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|err| ImageError::io("stage", &shown, err.into()))?;
                extract::copy_sparse(&mut e, &File::from(fd)).map_err(|err| {
                    if extract::refused_by_guard(&err).is_some() {
                        refused(err, &last)
                    } else {
                        ImageError::io("stage", &shown, err)
                    }
                })?;
                Member::File(n)
            } else if kind.is_symlink() {
                Member::Symlink(link()?)
            } else if kind.is_hard_link() {
                Member::HardLink(link()?)
            } else if kind.is_dir() {
                Member::Directory
            } else if kind.is_fifo() {
                Member::Other("a fifo")
            } else if kind.is_character_special() || kind.is_block_special() {
                Member::Other("a device node")
            } else {
                Member::Other("an entry of an unusual type")
            };
            table.insert(path, member);
        }
        Ok(Self { dir, table })
    }

    /// The member `at` (a symlink to `target`) points to, within the archive.
    fn symlink_target(name: &str, at: &Path, target: &Path) -> Result<PathBuf, ImageError> {
        let shown = target.display();
        let mut out: Vec<&std::ffi::OsStr> = Vec::new();
        if let Some(parent) = at.parent() {
            out.extend(parent.iter());
        }
        for c in target.components() {
            match c {
                Component::Normal(p) => out.push(p),
                Component::CurDir => {}
                Component::ParentDir => {
                    if out.pop().is_none() {
                        return Err(hostile(
                            name,
                            format!("it is a symlink to {shown}, which leaves the archive"),
                        ));
                    }
                }
                Component::RootDir | Component::Prefix(_) => {
                    return Err(hostile(
                        name,
                        format!("it is a symlink to {shown}, an absolute path outside the archive"),
                    ));
                }
            }
        }
        Ok(out.iter().collect())
    }
}

impl Members for StagedArchive {
    fn open(&self, name: &str) -> Result<File, ImageError> {
        let mut cur = extract::clean_path(Path::new(name))?;
        for _ in 0..MAX_ALIASES {
            match self.table.get(&cur) {
                Some(Member::File(n)) => {
                    let fd = rustix::fs::openat2(
                        &self.dir,
                        format!("m{n}"),
                        MEMBER_FLAGS,
                        Mode::empty(),
                        no_links(),
                    )
                    .map_err(|e| ImageError::io("open", name, e.into()))?;
                    return Ok(File::from(fd));
                }
                Some(Member::Symlink(target)) => {
                    cur = Self::symlink_target(name, &cur, target)?;
                }
                Some(Member::HardLink(target)) => {
                    cur = extract::clean_path(target).map_err(|_| {
                        hostile(
                            name,
                            format!(
                                "it is a hard link to {}, outside the archive",
                                target.display()
                            ),
                        )
                    })?;
                }
                Some(Member::Directory) => {
                    return Err(hostile(name, "it is a directory, not a file"));
                }
                Some(Member::Other(what)) => {
                    return Err(hostile(name, format!("it is {what}, not a file")));
                }
                None => {
                    let linked = cur.ancestors().skip(1).find(|a| {
                        matches!(
                            self.table.get(*a),
                            Some(Member::Symlink(_) | Member::HardLink(_))
                        )
                    });
                    return Err(match linked {
                        Some(a) => hostile(
                            name,
                            format!(
                                "it is reached through the link {}: dev-box never follows links in an archive",
                                a.display()
                            ),
                        ),
                        None => ImageError::Format(format!("the archive has no {name}")),
                    });
                }
            }
        }
        Err(hostile(name, "it is a chain of too many links"))
    }
}

/// Reads a small member (an index, manifest or config) whole.
fn read_member(m: &dyn Members, name: &str) -> Result<Vec<u8>, ImageError> {
    let mut data = Vec::new();
    m.open(name)?
        .take(MAX_JSON + 1)
        .read_to_end(&mut data)
        .map_err(|e| ImageError::io("read", name, e))?;
    if data.len() as u64 > MAX_JSON {
        return Err(ImageError::Format(format!(
            "{name} is larger than {}: not an image manifest or config",
            extract::human(MAX_JSON)
        )));
    }
    Ok(data)
}

/// The hex of a `sha256:` digest.
fn digest_hex<'a>(digest: &'a str, what: &str) -> Result<&'a str, ImageError> {
    digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .ok_or_else(|| {
            ImageError::Format(format!(
                "unsupported {what} {digest:?} (only sha256, in lowercase hex, is supported)"
            ))
        })
}

fn blob_name(digest: &str) -> Result<String, ImageError> {
    Ok(format!("blobs/sha256/{}", digest_hex(digest, "digest")?))
}

/// Checks that `file`, blob `name`, has the size its descriptor gives, before any of it is
/// read (or decompressed).
fn check_size(file: &File, name: &str, desc: &Descriptor) -> Result<(), ImageError> {
    let Some(want) = desc.size else {
        return Err(ImageError::Format(format!(
            "the descriptor of {} gives no size (an OCI descriptor must)",
            desc.digest
        )));
    };
    let got = file
        .metadata()
        .map_err(|e| ImageError::io("stat", name, e))?
        .len();
    if got != want {
        return Err(ImageError::Corrupt(format!(
            "{name} is {got} bytes but its descriptor says {want}"
        )));
    }
    Ok(())
}

/// Reads the blob `desc` names whole and checks it: its size, then its digest.
fn read_verified(m: &dyn Members, desc: &Descriptor) -> Result<Vec<u8>, ImageError> {
    let digest = desc.digest.as_str();
    let name = blob_name(digest)?;
    check_size(&m.open(&name)?, &name, desc)?;
    let data = read_member(m, &name)?;
    let got = format!("sha256:{}", hex::encode(Sha256::digest(&data)));
    if got != digest {
        return Err(ImageError::Corrupt(format!(
            "{name} does not match its digest {digest}"
        )));
    }
    Ok(data)
}

/// Applies layer `name` to `root`, in one pass over its bytes, and checks them: the raw
/// bytes against `blob_digest` (when given) and the uncompressed tar stream against
/// `diff_id`. Anything written before a mismatch is found is discarded with the import.
fn apply_layer(
    m: &dyn Members,
    name: &str,
    blob: Option<&Descriptor>,
    diff_id: &str,
    position: usize,
    root: &Path,
    budget: &mut Budget,
) -> Result<(), ImageError> {
    digest_hex(diff_id, "diff id")?;
    let blob_digest = blob.map(|d| d.digest.as_str());
    let file = m.open(name)?;
    // An OCI descriptor's size (required there); a docker layer named as a blob has none.
    if let Some(desc) = blob.filter(|d| d.size.is_some()) {
        check_size(&file, name, desc)?;
    }
    let mut raw = Hashing {
        inner: file,
        hasher: Sha256::new(),
    };
    let applied = (|| -> Result<String, ImageError> {
        let mut tar_stream = Hashing {
            inner: extract::decompressed(&mut raw)?,
            hasher: Sha256::new(),
        };
        extract::extract(
            &mut tar_stream,
            root,
            ExtractOptions {
                whiteouts: true,
                ..Default::default()
            },
            budget,
        )?;
        // The extractor read the end-of-archive padding too (bounded), so the digest
        // covers the whole stream.
        Ok(format!(
            "sha256:{}",
            hex::encode(tar_stream.hasher.finalize())
        ))
    })();
    // The rest of the raw bytes (a compressed stream's trailer), so a damaged blob is
    // reported as such even when it broke the extraction.
    let drained = io::copy(&mut raw, &mut io::sink());
    if let Some(want) = blob_digest
        && (drained.is_err() || format!("sha256:{}", hex::encode(raw.hasher.finalize())) != want)
    {
        return Err(ImageError::Corrupt(format!(
            "layer {name} does not match its digest {want}"
        )));
    }
    let got = applied?;
    if got != diff_id {
        return Err(ImageError::Corrupt(format!(
            "layer {name} does not match rootfs.diff_ids[{position}] of the image config ({diff_id}): its content is {got}"
        )));
    }
    Ok(())
}

/// The config's diff ids, which must name every layer of the manifest, in order.
fn diff_ids_for(
    config: &ConfigFile,
    layers: usize,
    lister: &str,
) -> Result<Vec<String>, ImageError> {
    let diff_ids = config
        .rootfs
        .as_ref()
        .map(|r| r.diff_ids.clone())
        .unwrap_or_default();
    if diff_ids.is_empty() && layers > 0 {
        return Err(ImageError::Corrupt(format!(
            "its layers cannot be verified: the image config lists no rootfs.diff_ids for the {layers} layer(s) of {lister}, and dev-box imports only layers a digest vouches for"
        )));
    }
    if diff_ids.len() != layers {
        return Err(ImageError::Corrupt(format!(
            "{lister} lists {layers} layer(s) but the image config's rootfs.diff_ids lists {}: every layer must be named by a diff id",
            diff_ids.len()
        )));
    }
    Ok(diff_ids)
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

/// Reads an OCI image layout and flattens its image into `root`.
pub(crate) fn unpack_oci_layout(
    m: &dyn Members,
    root: &Path,
    budget: &mut Budget,
) -> Result<Unpacked, ImageError> {
    let index: Index = serde_json::from_slice(&read_member(m, "index.json")?)
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
        let data = read_verified(m, &desc)?;
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
    let data = read_verified(m, &desc)?;
    let manifest: Manifest = serde_json::from_slice(&data)
        .map_err(|e| ImageError::Format(format!("image manifest: {e}")))?;
    let config_bytes = read_verified(m, &manifest.config)?;
    let config: ConfigFile = serde_json::from_slice(&config_bytes)
        .map_err(|e| ImageError::Format(format!("image config: {e}")))?;
    let diff_ids = diff_ids_for(&config, manifest.layers.len(), "the image manifest")?;
    for (i, layer) in manifest.layers.iter().enumerate() {
        if layer.size.is_none() {
            return Err(ImageError::Format(format!(
                "the descriptor of layer {} gives no size (an OCI descriptor must)",
                layer.digest
            )));
        }
        apply_layer(
            m,
            &blob_name(&layer.digest)?,
            Some(layer),
            &diff_ids[i],
            i,
            root,
            budget,
        )?;
    }
    let id = digest_hex(&manifest.config.digest, "digest")?.to_string();
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

/// Reads a `docker save` archive and flattens its (first) image into `root`.
pub(crate) fn unpack_docker_save(
    m: &dyn Members,
    root: &Path,
    budget: &mut Budget,
) -> Result<Unpacked, ImageError> {
    let entries: Vec<DockerManifestEntry> =
        serde_json::from_slice(&read_member(m, "manifest.json")?)
            .map_err(|e| ImageError::Format(format!("manifest.json: {e}")))?;
    let entry = entries
        .into_iter()
        .next()
        .ok_or_else(|| ImageError::Format("manifest.json lists no image".into()))?;
    let config_bytes = read_member(m, &entry.config)?;
    let id = docker_config_id(&entry.config, &config_bytes)?;
    let config: ConfigFile = serde_json::from_slice(&config_bytes)
        .map_err(|e| ImageError::Format(format!("image config: {e}")))?;
    let diff_ids = diff_ids_for(&config, entry.layers.len(), "manifest.json")?;
    for (i, layer) in entry.layers.iter().enumerate() {
        let rel = extract::clean_path(Path::new(layer))?;
        // A layer stored as a blob is named by the digest of its bytes: check that too.
        let blob = rel
            .strip_prefix("blobs/sha256")
            .ok()
            .and_then(|p| p.to_str())
            .map(|h| Descriptor {
                media_type: String::new(),
                digest: format!("sha256:{h}"),
                size: None,
                platform: None,
                annotations: Default::default(),
            });
        if let Some(b) = &blob {
            digest_hex(&b.digest, "blob name")?;
        }
        apply_layer(m, layer, blob.as_ref(), &diff_ids[i], i, root, budget)?;
    }
    let name = entry.repo_tags.and_then(|t| t.into_iter().next());
    Ok(Unpacked {
        id,
        name,
        config: run_config(config),
    })
}

/// The id of a `docker save` image: the sha256 of its config's bytes. A config named by a
/// digest (`<hex>.json`, `blobs/sha256/<hex>`, either with `sha256:` before the hex) must
/// match it; a name that looks like a digest but is not one in lowercase sha256 hex is
/// refused, so no name ever stands in for the bytes.
fn docker_config_id(name: &str, bytes: &[u8]) -> Result<String, ImageError> {
    let id = hex::encode(Sha256::digest(bytes));
    let rel = extract::clean_path(Path::new(name))?;
    let file = rel.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let stem = file.strip_suffix(".json").unwrap_or(file);
    let stem = stem.strip_prefix("sha256:").unwrap_or(stem);
    let in_blobs = rel.parent() == Some(Path::new("blobs/sha256"));
    let looks_like_digest = stem.len() == 64 && stem.bytes().all(|b| b.is_ascii_hexdigit());
    if (in_blobs || looks_like_digest) && stem != id {
        return Err(ImageError::Corrupt(format!(
            "the image config {name} does not match its digest: its content is sha256:{id}"
        )));
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(data: &[u8]) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(data)))
    }

    fn tar_with(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        b.into_inner().unwrap()
    }

    fn raw(
        b: &mut tar::Builder<Vec<u8>>,
        kind: tar::EntryType,
        name: &str,
        link: &str,
        data: &[u8],
    ) {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_cksum();
        b.append(&h, data).unwrap();
    }

    fn file(b: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) {
        raw(b, tar::EntryType::Regular, name, "", data);
    }

    fn layer(content: &[u8]) -> Vec<u8> {
        tar_with(|b| file(b, "etc/greeting", content))
    }

    fn config(diff_ids: &[String]) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }))
        .unwrap()
    }

    /// A docker save archive: `layers` are names listed in manifest.json, `extra` adds members.
    fn docker(
        diff_ids: &[String],
        layers: &[&str],
        extra: impl FnOnce(&mut tar::Builder<Vec<u8>>),
    ) -> Vec<u8> {
        let cfg = config(diff_ids);
        let cfg_name = format!("{}.json", &sha(&cfg)[7..]);
        let manifest = serde_json::to_vec(
            &serde_json::json!([{"Config": cfg_name, "RepoTags": ["t:1"], "Layers": layers}]),
        )
        .unwrap();
        tar_with(|b| {
            file(b, "manifest.json", &manifest);
            file(b, &cfg_name, &cfg);
            extra(b);
        })
    }

    fn unpack(archive: &[u8]) -> Result<(tempfile::TempDir, Unpacked), ImageError> {
        let stage = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        let mut budget = Budget::unlimited();
        let members = StagedArchive::read(archive, stage.path(), &mut budget)?;
        let u = unpack_docker_save(&members, root.path(), &mut budget)?;
        Ok((root, u))
    }

    #[test]
    fn archive_links_never_leave_the_archive() {
        // A host file holding a valid layer; the attacker knows its digest.
        let host = tempfile::tempdir().unwrap();
        let secret_layer = layer(b"host secret\n");
        let secret = host.path().join("secret.tar");
        std::fs::write(&secret, &secret_layer).unwrap();
        let secret = secret.to_str().unwrap().to_string();
        let up = format!("../../../../../../../..{secret}");
        let ids = [sha(&secret_layer)];
        let sym = tar::EntryType::Symlink;
        let hard = tar::EntryType::Link;
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "absolute symlink",
                docker(&ids, &["l1/layer.tar"], |b| {
                    raw(b, sym, "l1/layer.tar", &secret, b"")
                }),
            ),
            (
                "relative symlink",
                docker(&ids, &["l1/layer.tar"], |b| {
                    raw(b, sym, "l1/layer.tar", &up, b"")
                }),
            ),
            (
                "absolute hard link",
                docker(&ids, &["l1/layer.tar"], |b| {
                    raw(b, hard, "l1/layer.tar", &secret, b"")
                }),
            ),
            (
                "dotdot hard link",
                docker(&ids, &["l1/layer.tar"], |b| {
                    raw(b, hard, "l1/layer.tar", &up, b"")
                }),
            ),
            (
                "linked directory",
                docker(&ids, &["l1/layer.tar"], |b| {
                    raw(b, sym, "l1", host.path().to_str().unwrap(), b"")
                }),
            ),
            ("dotdot layer name", docker(&ids, &[&up], |_| {})),
            ("absolute layer name", docker(&ids, &[&secret], |_| {})),
            (
                "symlinked manifest",
                tar_with(|b| raw(b, sym, "manifest.json", &secret, b"")),
            ),
            (
                "device",
                docker(&ids, &["l1/layer.tar"], |b| {
                    raw(b, tar::EntryType::Char, "l1/layer.tar", "", b"")
                }),
            ),
        ];
        for (what, archive) in cases {
            match unpack(&archive) {
                Err(ImageError::Hostile { .. }) => {}
                Err(other) => panic!("{what}: {other}"),
                Ok(_) => panic!("{what}: imported"),
            }
        }
        // An alias between members of the archive itself (docker writes these for layers it
        // already saved) is fine: it is the archive's own content, verified.
        let l = layer(b"shared\n");
        let ids = [sha(&l), sha(&l)];
        let archive = docker(&ids, &["a/layer.tar", "b/layer.tar"], |b| {
            file(b, "a/layer.tar", &l);
            raw(b, sym, "b/layer.tar", "../a/layer.tar", b"");
        });
        let (root, _) = unpack(&archive).unwrap();
        assert_eq!(
            std::fs::read(root.path().join("etc/greeting")).unwrap(),
            b"shared\n"
        );
    }

    #[test]
    fn layers_are_verified() {
        let good = layer(b"genuine\n");
        let evil = layer(b"doctored\n");
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            (
                "a layer beyond the diff ids",
                docker(&[sha(&good)], &["a/layer.tar", "b/layer.tar"], |b| {
                    file(b, "a/layer.tar", &good);
                    file(b, "b/layer.tar", &evil);
                }),
                "every layer must be named",
            ),
            (
                "content differing from its diff id",
                docker(&[sha(&good)], &["a/layer.tar"], |b| {
                    file(b, "a/layer.tar", &evil)
                }),
                "does not match rootfs.diff_ids[0]",
            ),
            (
                "no diff ids at all",
                docker(&[], &["a/layer.tar"], |b| file(b, "a/layer.tar", &evil)),
                "cannot be verified",
            ),
            (
                "a blob named by another digest",
                docker(
                    &[sha(&evil)],
                    &[&format!("blobs/sha256/{}", &sha(&good)[7..])],
                    |b| file(b, &format!("blobs/sha256/{}", &sha(&good)[7..]), &evil),
                ),
                "does not match its digest",
            ),
        ];
        for (what, archive, says) in cases {
            match unpack(&archive) {
                Err(e @ ImageError::Corrupt(_)) => {
                    assert!(e.to_string().contains(says), "{what}: {e}")
                }
                Err(other) => panic!("{what}: {other}"),
                Ok(_) => panic!("{what}: imported"),
            }
        }
        let (root, u) = unpack(&docker(&[sha(&good)], &["a/layer.tar"], |b| {
            file(b, "a/layer.tar", &good)
        }))
        .unwrap();
        assert_eq!(
            std::fs::read(root.path().join("etc/greeting")).unwrap(),
            b"genuine\n"
        );
        assert_eq!(u.name.as_deref(), Some("t:1"));
    }

    #[test]
    fn layout_directories_are_read_without_links() {
        let host = tempfile::tempdir().unwrap();
        let secret = host.path().join("secret");
        std::fs::write(&secret, b"host secret").unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("blobs/sha256")).unwrap();
        std::os::unix::fs::symlink(&secret, dir.path().join("blobs/sha256/link")).unwrap();
        std::fs::hard_link(&secret, dir.path().join("blobs/sha256/hard")).unwrap();
        std::os::unix::fs::symlink(host.path(), dir.path().join("up")).unwrap();
        std::fs::write(dir.path().join("plain"), b"ok").unwrap();
        let m = DirMembers::open_dir(dir.path()).unwrap();
        for name in [
            "blobs/sha256/link",
            "blobs/sha256/hard",
            "up/secret",
            "../secret",
            "blobs",
        ] {
            assert!(
                matches!(m.open(name), Err(ImageError::Hostile { .. })),
                "{name}"
            );
        }
        let mut text = String::new();
        m.open("plain").unwrap().read_to_string(&mut text).unwrap();
        assert_eq!(text, "ok");
    }

    #[test]
    fn docker_configs_are_named_by_their_digest_or_not_at_all() {
        let cfg = config(&[]);
        let id = &sha(&cfg)[7..];
        assert_eq!(docker_config_id(&format!("{id}.json"), &cfg).unwrap(), id);
        assert_eq!(
            docker_config_id(&format!("blobs/sha256/{id}"), &cfg).unwrap(),
            id
        );
        // A name that is no digest: the id is still the digest of the bytes.
        assert_eq!(docker_config_id("config.json", &cfg).unwrap(), id);
        let other = "a".repeat(64);
        for name in [
            format!("{other}.json"),
            format!("blobs/sha256/{other}"),
            format!("sha256:{other}.json"),
            format!("{}.json", id.to_uppercase()),
            "blobs/sha256/short".to_string(),
        ] {
            assert!(
                matches!(docker_config_id(&name, &cfg), Err(ImageError::Corrupt(_))),
                "{name}"
            );
        }
        // Through an import: a config under another name imports under its own digest.
        let l = layer(b"x\n");
        let cfg = config(&[sha(&l)]);
        let manifest = serde_json::to_vec(
            &serde_json::json!([{"Config": "config.json", "Layers": ["a/layer.tar"]}]),
        )
        .unwrap();
        let archive = tar_with(|b| {
            file(b, "manifest.json", &manifest);
            file(b, "config.json", &cfg);
            file(b, "a/layer.tar", &l);
        });
        let (_, u) = unpack(&archive).unwrap();
        assert_eq!(u.id, sha(&cfg)[7..]);
    }

    #[test]
    fn data_after_a_layer_is_bounded() {
        // A valid layer followed by 32 MiB of zeros, which its diff id covers.
        let mut l = layer(b"x\n");
        l.extend(std::iter::repeat_n(0u8, 32 << 20));
        let archive = docker(&[sha(&l)], &["a/layer.tar"], |b| file(b, "a/layer.tar", &l));
        let err = unpack(&archive).err().unwrap();
        assert!(
            err.to_string()
                .contains("follows the end of the tar archive"),
            "{err}"
        );
    }

    #[test]
    fn archive_names_are_bounded_before_they_are_kept() {
        let long = "n".repeat(extract::MAX_NAME + 1);
        let archive = tar_with(|b| {
            for i in 0..3 {
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                b.append_link(&mut h, format!("l{i}"), &long).unwrap();
            }
        });
        let stage = tempfile::tempdir().unwrap();
        let err = StagedArchive::read(&archive[..], stage.path(), &mut Budget::unlimited())
            .err()
            .unwrap();
        assert!(
            matches!(err, ImageError::Hostile { .. }) && err.to_string().contains("4096"),
            "{err}"
        );
        let many = tar_with(|b| {
            for i in 0..20 {
                raw(b, tar::EntryType::Directory, &format!("d{i}"), "", b"");
            }
        });
        let stage = tempfile::tempdir().unwrap();
        let err = StagedArchive::read(
            &many[..],
            stage.path(),
            &mut Budget::unlimited().with_entry_limits(10, u64::MAX),
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("more than 10 entries"), "{err}");
    }

    /// An OCI layout directory of one layer; `size` rewrites the layer's descriptor size.
    fn layout(dir: &Path, l: &[u8], size: Option<u64>) {
        let cfg = config(&[sha(l)]);
        let blobs = dir.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        std::fs::write(blobs.join(&sha(l)[7..]), l).unwrap();
        std::fs::write(blobs.join(&sha(&cfg)[7..]), &cfg).unwrap();
        let mut layer_desc = serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha(l)});
        if let Some(n) = size {
            layer_desc["size"] = n.into();
        }
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(&cfg), "size": cfg.len()},
            "layers": [layer_desc],
        }))
        .unwrap();
        std::fs::write(blobs.join(&sha(&manifest)[7..]), &manifest).unwrap();
        let index = serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha(&manifest), "size": manifest.len()}]}))
        .unwrap();
        std::fs::write(dir.join("index.json"), index).unwrap();
    }

    #[test]
    fn descriptor_sizes_are_checked_before_reading() {
        let l = layer(b"sized\n");
        let cases = [
            (Some(l.len() as u64 + 1), "descriptor says"),
            (Some(1), "descriptor says"),
            (None, "gives no size"),
        ];
        for (size, says) in cases {
            let dir = tempfile::tempdir().unwrap();
            layout(dir.path(), &l, size);
            let root = tempfile::tempdir().unwrap();
            let m = DirMembers::open_dir(dir.path()).unwrap();
            let err = unpack_oci_layout(&m, root.path(), &mut Budget::unlimited())
                .err()
                .unwrap();
            assert!(err.to_string().contains(says), "{size:?}: {err}");
            assert!(std::fs::read_dir(root.path()).unwrap().next().is_none());
        }
        let dir = tempfile::tempdir().unwrap();
        layout(dir.path(), &l, Some(l.len() as u64));
        let root = tempfile::tempdir().unwrap();
        let m = DirMembers::open_dir(dir.path()).unwrap();
        unpack_oci_layout(&m, root.path(), &mut Budget::unlimited()).unwrap();
        assert_eq!(
            std::fs::read(root.path().join("etc/greeting")).unwrap(),
            b"sized\n"
        );
    }
}
