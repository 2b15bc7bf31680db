//! Images: read-only root filesystems that sandboxes start from.
//!
//! [`ImageStore`] keeps each image as a read-only volume `images/<id>` in the storage pool,
//! where `<id>` is a sha256 of its content (the archive's bytes, the OCI config digest, or a
//! digest of a directory's tree), so importing the same thing twice stores it once. Sandboxes
//! share images as overlay lower layers.
//!
//! Imports accept a rootfs tarball (plain, gzip or zstd), a rootfs directory, an OCI image
//! layout (directory or archive) and a `docker save` archive. Archives are untrusted: see
//! [`extract`] (paths, sizes, sparse files) and [`oci`] (links between members, digests). An
//! image's id is computed from the very bytes that were extracted (a tarball's, in the same
//! pass), or is an OCI config digest whose diff ids verified every layer. An import that
//! fails leaves nothing behind.
//!
//! The `host` image ([`host`]) is built on first use from the host's own system.

pub mod extract;
pub mod host;
pub mod oci;

use std::io::{self, Read};
use std::path::{Path, PathBuf};

use devbox_storage::{Pool, StorageError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The id of the built-in host image.
pub const HOST_IMAGE: &str = "host";

/// Errors of image operations.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// An archive entry tries to escape or is not allowed.
    #[error("refusing archive entry {entry:?}: {reason}")]
    Hostile {
        /// The entry's name as stored.
        entry: String,
        /// Why it is refused.
        reason: String,
    },
    /// A digest does not match: the archive is damaged or tampered with.
    #[error("the image is corrupted: {0}")]
    Corrupt(String),
    /// The input is not in a known format.
    #[error("unrecognised image: {0}")]
    Format(String),
    /// A filesystem operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: String,
        /// The cause.
        source: io::Error,
    },
    /// The pool failed (full, for instance).
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl ImageError {
    pub(crate) fn io(op: &'static str, path: &str, source: io::Error) -> Self {
        Self::Io {
            op,
            path: path.to_string(),
            source,
        }
    }

    /// Whether the error comes from a full pool.
    pub fn is_full(&self) -> bool {
        match self {
            Self::Io { source, .. } => Pool::is_full_error(source),
            Self::Storage(StorageError::Full { .. }) => true,
            _ => false,
        }
    }
}

/// How processes run by default in an image (from an OCI config).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// Environment, `KEY=value`.
    #[serde(default)]
    pub env: Vec<String>,
    /// Working directory.
    #[serde(default)]
    pub workdir: Option<String>,
    /// User.
    #[serde(default)]
    pub user: Option<String>,
    /// Entrypoint.
    #[serde(default)]
    pub entrypoint: Vec<String>,
    /// Default command.
    #[serde(default)]
    pub cmd: Vec<String>,
}

/// Where an image came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageFormat {
    /// The host's system.
    Host,
    /// A rootfs tarball.
    RootfsTar,
    /// A rootfs directory.
    Directory,
    /// An OCI image layout.
    OciLayout,
    /// A `docker save` archive.
    DockerArchive,
}

/// The result of an import.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Imported {
    /// Content id (sha256 hex).
    pub id: String,
    /// A name found in the source (`busybox:latest`) or made from its file name.
    pub name_hint: Option<String>,
    /// Source format.
    pub format: ImageFormat,
    /// Run settings.
    pub config: ImageConfig,
    /// Bytes of files in the image.
    pub size_bytes: u64,
    /// The same content was already stored; nothing new was written.
    pub existed: bool,
}

/// Reads `inner` while hashing it.
pub(crate) struct Hashing<R> {
    pub(crate) inner: R,
    pub(crate) hasher: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// The pool's image volumes.
#[derive(Debug, Clone)]
pub struct ImageStore {
    pool: Pool,
}

impl ImageStore {
    /// An image store on `pool`.
    pub fn new(pool: Pool) -> Self {
        Self { pool }
    }

    /// The volume of image `id`.
    pub fn path(&self, id: &str) -> PathBuf {
        self.pool.images_dir().join(id)
    }

    /// Whether image `id` is stored.
    pub fn exists(&self, id: &str) -> bool {
        self.path(id).is_dir()
    }

    /// Ids of every stored image volume.
    pub fn stored_ids(&self) -> Vec<String> {
        std::fs::read_dir(self.pool.images_dir())
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().to_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Removes leftovers of interrupted imports.
    pub fn clear_staging(&self) {
        let Ok(dir) = std::fs::read_dir(self.pool.staging_dir()) else {
            return;
        };
        for e in dir.flatten() {
            self.discard(&e.path());
        }
    }

    fn discard(&self, stage: &Path) {
        if let Ok(dir) = std::fs::read_dir(stage) {
            for e in dir.flatten() {
                let _ = self.pool.delete_volume(&e.path());
            }
        }
        let _ = self.pool.delete_volume(stage);
    }

    /// Builds the host image if it is missing; returns its volume.
    pub fn ensure_host(&self) -> Result<PathBuf, ImageError> {
        static BUILDING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one_at_a_time = BUILDING.lock().unwrap_or_else(|p| p.into_inner());
        let dest = self.path(HOST_IMAGE);
        if dest.is_dir() {
            return Ok(dest);
        }
        let stage = self.new_stage()?;
        let rootfs = stage.join("rootfs");
        let built = (|| {
            self.pool.create_volume(&rootfs)?;
            host::build_skeleton(&rootfs).map_err(|e| {
                ImageError::io("build host image", &rootfs.display().to_string(), e)
            })?;
            std::fs::rename(&rootfs, &dest)
                .map_err(|e| ImageError::io("store", &dest.display().to_string(), e))?;
            self.pool.set_readonly(&dest, true)?;
            Ok(())
        })();
        self.discard(&stage);
        built.map(|_| dest)
    }

    fn new_stage(&self) -> Result<PathBuf, ImageError> {
        let mut rnd = [0u8; 8];
        getrandom_fill(&mut rnd);
        let stage = self
            .pool
            .staging_dir()
            .join(format!("import-{}", hex::encode(rnd)));
        std::fs::create_dir(&stage)
            .map_err(|e| ImageError::io("create", &stage.display().to_string(), e))?;
        Ok(stage)
    }

    /// Imports an image from a file or directory on this host, within the pool's budget
    /// (`DEVBOX_IMPORT_MAX_BYTES` and its free space, see [`extract::Budget`]).
    pub fn import(&self, source: &Path) -> Result<Imported, ImageError> {
        self.import_within(source, extract::Budget::for_pool(&self.pool)?)
    }

    /// Imports an image within `budget`.
    pub fn import_within(
        &self,
        source: &Path,
        mut budget: extract::Budget,
    ) -> Result<Imported, ImageError> {
        let shown = source.display().to_string();
        let meta = std::fs::metadata(source).map_err(|e| ImageError::io("read", &shown, e))?;
        let stage = self.new_stage()?;
        let result = self.import_into(source, &meta, &stage, &mut budget);
        let outcome = match result {
            Ok((id, name_hint, format, config)) => {
                self.commit(&stage, id, name_hint, format, config)
            }
            Err(e) => Err(e),
        };
        self.discard(&stage);
        outcome.map_err(|e| {
            if e.is_full() {
                ImageError::Storage(self.pool.full())
            } else {
                e
            }
        })
    }

    fn commit(
        &self,
        stage: &Path,
        id: String,
        name_hint: Option<String>,
        format: ImageFormat,
        config: ImageConfig,
    ) -> Result<Imported, ImageError> {
        let dest = self.path(&id);
        let existed = dest.is_dir();
        if !existed {
            let rootfs = stage.join("rootfs");
            std::fs::rename(&rootfs, &dest)
                .map_err(|e| ImageError::io("store", &dest.display().to_string(), e))?;
            self.pool.set_readonly(&dest, true)?;
        }
        let size_bytes = self.pool.volume_usage(&dest);
        Ok(Imported {
            id,
            name_hint,
            format,
            config,
            size_bytes,
            existed,
        })
    }

    #[allow(clippy::type_complexity)]
    fn import_into(
        &self,
        source: &Path,
        meta: &std::fs::Metadata,
        stage: &Path,
        budget: &mut extract::Budget,
    ) -> Result<(String, Option<String>, ImageFormat, ImageConfig), ImageError> {
        let rootfs = stage.join("rootfs");
        self.pool.create_volume(&rootfs)?;
        let stem = source
            .file_name()
            .and_then(|n| n.to_str())
            .map(|n| n.split('.').next().unwrap_or(n).to_string())
            .filter(|n| !n.is_empty());
        if meta.is_dir() {
            let has = |n: &str| std::fs::symlink_metadata(source.join(n)).is_ok();
            if has("oci-layout") {
                let members = oci::DirMembers::open_dir(source)?;
                let u = oci::unpack_oci_layout(&members, &rootfs, budget)?;
                return Ok((u.id, u.name.or(stem), ImageFormat::OciLayout, u.config));
            }
            if has("manifest.json") {
                let members = oci::DirMembers::open_dir(source)?;
                let u = oci::unpack_docker_save(&members, &rootfs, budget)?;
                return Ok((u.id, u.name.or(stem), ImageFormat::DockerArchive, u.config));
            }
            let id = copy_directory(source, &rootfs, budget)?;
            return Ok((id, stem, ImageFormat::Directory, ImageConfig::default()));
        }
        if !meta.is_file() {
            return Err(ImageError::Format(format!(
                "{} is neither a file nor a directory",
                source.display()
            )));
        }
        let shown = source.display().to_string();
        let open = || std::fs::File::open(source).map_err(|e| ImageError::io("open", &shown, e));
        match classify(extract::decompressed(open()?)?, budget.max_bytes())? {
            ArchiveKind::Rootfs => {
                // One pass: the id is the digest of the very bytes extracted.
                let mut hashing = Hashing {
                    inner: open()?,
                    hasher: Sha256::new(),
                };
                extract::extract(
                    extract::decompressed(&mut hashing)?,
                    &rootfs,
                    extract::ExtractOptions::default(),
                    budget,
                )?;
                io::copy(&mut hashing, &mut io::sink())
                    .map_err(|e| ImageError::io("read", &shown, e))?;
                let id = hex::encode(hashing.hasher.finalize());
                Ok((id, stem, ImageFormat::RootfsTar, ImageConfig::default()))
            }
            kind => {
                let unpacked = stage.join("archive");
                std::fs::create_dir(&unpacked)
                    .map_err(|e| ImageError::io("create", &unpacked.display().to_string(), e))?;
                let members =
                    oci::StagedArchive::read(extract::decompressed(open()?)?, &unpacked, budget)?;
                let (u, format) = if kind == ArchiveKind::OciLayout {
                    (
                        oci::unpack_oci_layout(&members, &rootfs, budget)?,
                        ImageFormat::OciLayout,
                    )
                } else {
                    (
                        oci::unpack_docker_save(&members, &rootfs, budget)?,
                        ImageFormat::DockerArchive,
                    )
                };
                Ok((u.id, u.name.or(stem), format, u.config))
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ArchiveKind {
    Rootfs,
    OciLayout,
    DockerSave,
}

/// Tells image archives from rootfs tarballs by their top-level entries; refuses, before
/// anything is written, an archive whose entries (their data, names and number, and the
/// stream around them, see [`extract::Budget`]) are over the import's bounds.
fn classify(reader: Box<dyn Read + '_>, max_bytes: u64) -> Result<ArchiveKind, ImageError> {
    // A budget of its own: this pass writes nothing, the import's budget is charged later.
    let mut probe = extract::Budget::new(max_bytes, u64::MAX);
    let mut archive = tar::Archive::new(extract::guarded_within(reader, &probe));
    let mut docker = false;
    let mut oci = false;
    let mut last: Option<String> = None;
    let entries = archive
        .entries()
        .map_err(|e| ImageError::Format(format!("not a tar archive: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| match extract::refused_by_guard(&e) {
            Some(why) => ImageError::Hostile {
                entry: last.clone().unwrap_or_else(|| "(the first header)".into()),
                reason: why,
            },
            None => ImageError::Format(format!("not a tar archive: {e}")),
        })?;
        last = Some(extract::charge_entry(&mut entry, &mut probe, false)?);
        let path = entry
            .path()
            .map_err(|e| ImageError::Format(format!("unreadable entry name: {e}")))?;
        let clean = path.strip_prefix("./").unwrap_or(&path);
        if clean == Path::new("oci-layout") {
            oci = true;
        }
        if clean == Path::new("manifest.json") {
            docker = true;
        }
    }
    Ok(if oci {
        ArchiveKind::OciLayout
    } else if docker {
        ArchiveKind::DockerSave
    } else {
        ArchiveKind::Rootfs
    })
}

/// Copies a rootfs directory into `dest` through the safe extractor; returns a digest of the
/// tree (names, metadata and contents as a tar stream).
fn copy_directory(
    source: &Path,
    dest: &Path,
    budget: &mut extract::Budget,
) -> Result<String, ImageError> {
    let (reader, writer) = io::pipe().map_err(|e| ImageError::io("pipe", "", e))?;
    let src = source.to_path_buf();
    let producer = std::thread::spawn(move || -> io::Result<()> {
        let mut b = tar::Builder::new(writer);
        b.follow_symlinks(false);
        b.mode(tar::HeaderMode::Complete);
        b.append_dir_all(".", &src)?;
        b.finish()
    });
    let mut hashing = Hashing {
        inner: reader,
        hasher: Sha256::new(),
    };
    let extracted = extract::extract(
        &mut hashing,
        dest,
        extract::ExtractOptions::default(),
        budget,
    );
    let _ = io::copy(&mut hashing, &mut io::sink());
    let produced = producer
        .join()
        .map_err(|_| ImageError::Format("directory reader panicked".into()))?;
    produced.map_err(|e| ImageError::io("read", &source.display().to_string(), e))?;
    extracted?;
    Ok(hex::encode(hashing.hasher.finalize()))
}

fn getrandom_fill(buf: &mut [u8]) {
    use std::io::Read as _;
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(buf);
    }
}
