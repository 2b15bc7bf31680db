//! Portable snapshots: export to and import from an archive.
//!
//! Format (`dev-box.snapshot/v1`): a zstd-compressed tar holding `manifest.json` and
//! `layer.tar`. The layer is the snapshot's writable layer (whiteouts and overlay xattrs
//! included, see [`devbox_storage::layers::archive`]); the manifest names the snapshot, the
//! sandbox's spec, the image it sits on (by id: the importing host must have it), and the
//! layer's sha256 and size. An import reads `manifest.json` first and checks it (its format,
//! and its sandbox spec with the validation `create` applies, limits included) before a byte
//! of the layer is written; it extracts the layer with the safe extractor within the import's
//! budget (`DEVBOX_IMPORT_MAX_BYTES` and the pool's free space, checked before each entry is
//! written, see [`devbox_image::extract::Budget`]), with runs of zeros left as holes, checks
//! the digest, and only then records anything (manifest.json is refused by its declared size
//! over 1 MiB, layer.tar when its declared size is not the manifest's, before either is
//! inflated): a corrupted or hostile archive changes
//! nothing. An export writes its scratch copy of the layer with holes too, so a sparse file
//! costs neither side its apparent size.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

use devbox_image::HOST_IMAGE;
use devbox_spec::{Name, SandboxManifest};
use devbox_store::{SandboxState, SnapshotState, now_ms};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::model::{SandboxInfo, rfc3339};
use crate::sandbox::new_id;
use crate::{Caller, Engine, EngineError, InternalSource, Result};

/// The archive format's name.
pub const SNAPSHOT_FORMAT: &str = "dev-box.snapshot/v1";
/// Largest manifest accepted.
const MAX_MANIFEST: u64 = 1 << 20;

/// `manifest.json` of a snapshot archive.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArchiveManifest {
    /// Always [`SNAPSHOT_FORMAT`].
    pub format: String,
    /// The snapshot.
    pub snapshot: ArchivedSnapshot,
    /// The sandbox it was taken of.
    pub sandbox: ArchivedSandbox,
    /// The image under the layer.
    pub image: ArchivedImage,
    /// The layer.
    pub layer: ArchivedLayer,
}

/// The snapshot in an archive.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArchivedSnapshot {
    /// Name.
    pub name: String,
    /// Taken (RFC 3339).
    pub created_at: String,
    /// Message.
    pub message: Option<String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
}

/// The sandbox in an archive.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArchivedSandbox {
    /// Its name.
    pub name: String,
    /// Its spec.
    pub manifest: SandboxManifest,
}

/// The image in an archive.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArchivedImage {
    /// Content id.
    pub id: String,
    /// Name where it was exported.
    pub name: String,
}

/// The layer in an archive.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArchivedLayer {
    /// `sha256:<hex>` of `layer.tar`.
    pub digest: String,
    /// Bytes of `layer.tar`.
    pub size: u64,
}

struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

/// Writes a file sequentially, leaving 4 KiB blocks of zeros as holes.
struct HoleyFile {
    file: std::fs::File,
    pos: u64,
    buf: Vec<u8>,
}

impl HoleyFile {
    const CHUNK: usize = 256 * 1024;

    fn new(file: std::fs::File) -> Self {
        Self {
            file,
            pos: 0,
            buf: Vec::with_capacity(Self::CHUNK),
        }
    }

    fn write_out(&mut self) -> io::Result<()> {
        devbox_image::extract::write_holey(&self.file, self.pos, &self.buf)?;
        self.pos += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }

    /// Writes what is buffered and sets the file's length (trailing zeros become a hole).
    fn finish(mut self) -> io::Result<()> {
        self.write_out()?;
        self.file.set_len(self.pos)
    }
}

impl Write for HoleyFile {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(Self::CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == Self::CHUNK {
            self.write_out()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

fn io_err(what: &'static str) -> impl Fn(io::Error) -> EngineError {
    move |e| EngineError::internal(what, e)
}

impl Engine {
    /// A fresh path in the pool's staging area (on the pool's filesystem).
    pub fn scratch_path(&self, prefix: &str) -> PathBuf {
        self.pool
            .staging_dir()
            .join(format!("{prefix}-{}", new_id()))
    }

    /// Writes a snapshot archive to a scratch file and returns its path; the caller streams
    /// and removes it.
    pub async fn export_snapshot(
        self: &Arc<Self>,
        caller: &Caller,
        name: &str,
        snapshot: &str,
    ) -> Result<PathBuf> {
        let (name, snapshot) = (name.to_string(), snapshot.to_string());
        let audit_name = name.to_string();
        let audit_detail = serde_json::json!({"snapshot": snapshot});
        let r = self
            .blocking(move |e| {
                let rec = e.record(&name)?;
                let snap = e.find_snapshot(&rec, &snapshot)?;
                let manifest = Self::manifest_of(&rec)?;
                let image_name = if rec.image_id == HOST_IMAGE {
                    HOST_IMAGE.to_string()
                } else {
                    e.store
                        .images()?
                        .into_iter()
                        .find(|i| i.id == rec.image_id)
                        .map(|i| i.name)
                        .unwrap_or_default()
                };
                let layer_path = e.scratch_path("export-layer");
                let out_path = e.scratch_path("export");
                let written = (|| -> Result<()> {
                    let file = std::fs::File::create(&layer_path).map_err(io_err("export"))?;
                    let mut w = HashingWriter {
                        inner: HoleyFile::new(file),
                        hasher: Sha256::new(),
                        count: 0,
                    };
                    w = devbox_storage::layers::archive(&e.snapshot_path(&snap).join("upper"), w)
                        .map_err(io_err("export layer"))?;
                    w.flush().map_err(io_err("export"))?;
                    let HashingWriter {
                        inner,
                        hasher,
                        count,
                    } = w;
                    inner.finish().map_err(io_err("export"))?;
                    let digest = format!("sha256:{}", hex::encode(hasher.finalize()));
                    let manifest = ArchiveManifest {
                        format: SNAPSHOT_FORMAT.into(),
                        snapshot: ArchivedSnapshot {
                            name: snap.name.clone(),
                            created_at: rfc3339(snap.created_at),
                            message: snap.message.clone(),
                            labels: serde_json::from_str(&snap.labels).unwrap_or_default(),
                        },
                        sandbox: ArchivedSandbox {
                            name: rec.name.clone(),
                            manifest,
                        },
                        image: ArchivedImage {
                            id: rec.image_id.clone(),
                            name: image_name,
                        },
                        layer: ArchivedLayer {
                            digest,
                            size: count,
                        },
                    };
                    let json = serde_json::to_vec_pretty(&manifest)
                        .map_err(|e| EngineError::internal("manifest", e))?;
                    let out = std::fs::File::create(&out_path).map_err(io_err("export"))?;
                    let zst =
                        zstd::stream::write::Encoder::new(out, 3).map_err(io_err("export"))?;
                    let mut tar = tar::Builder::new(zst);
                    let mut h = tar::Header::new_gnu();
                    h.set_size(json.len() as u64);
                    h.set_mode(0o644);
                    h.set_mtime((now_ms() / 1000) as u64);
                    tar.append_data(&mut h, "manifest.json", &json[..])
                        .map_err(io_err("export"))?;
                    let mut layer = std::fs::File::open(&layer_path).map_err(io_err("export"))?;
                    let mut h = tar::Header::new_gnu();
                    h.set_size(manifest.layer.size);
                    h.set_mode(0o644);
                    h.set_mtime((now_ms() / 1000) as u64);
                    tar.append_data(&mut h, "layer.tar", &mut layer)
                        .map_err(io_err("export"))?;
                    let zst = tar.into_inner().map_err(io_err("export"))?;
                    zst.finish()
                        .map_err(io_err("export"))?
                        .sync_all()
                        .map_err(io_err("export"))?;
                    Ok(())
                })();
                let _ = std::fs::remove_file(&layer_path);
                if let Err(err) = written {
                    let _ = std::fs::remove_file(&out_path);
                    return Err(match err {
                        EngineError::Internal {
                            source: InternalSource::Io(io),
                            ..
                        } if devbox_storage::Pool::is_full_error(&io) => e.pool.full().into(),
                        other => other,
                    });
                }
                Ok(out_path)
            })
            .await;
        self.audit_result(
            caller,
            "snapshot.export",
            Some(&audit_name),
            audit_detail,
            &r,
        );
        r
    }

    /// Makes a sandbox from a snapshot archive (its state is the snapshot, which heads its
    /// history). It is named `name`, or as in the archive.
    pub async fn import_snapshot(
        self: &Arc<Self>,
        caller: &Caller,
        archive: PathBuf,
        name: Option<String>,
        start: bool,
    ) -> Result<SandboxInfo> {
        let detail = serde_json::json!({"name": name, "start": start});
        let who = caller.clone();
        let r = self
            .blocking(move |e| e.import_snapshot_blocking(&who, &archive, name, start))
            .await;
        self.audit_result(
            caller,
            "snapshot.import",
            r.as_ref().ok().map(|i| i.name.as_str()),
            detail,
            &r,
        );
        r
    }

    fn import_snapshot_blocking(
        self: &Arc<Self>,
        caller: &Caller,
        archive: &std::path::Path,
        name: Option<String>,
        start: bool,
    ) -> Result<SandboxInfo> {
        let bad =
            |m: String| EngineError::InvalidRequest(format!("not a valid snapshot archive: {m}"));
        let scratch = self.scratch_path("import-layer");
        let volume_upper = scratch.join("upper");
        let mut budget = devbox_image::extract::Budget::for_pool(&self.pool)?;
        self.pool.create_volume(&scratch)?;
        let result = (|| -> Result<(ArchiveManifest, String, u64)> {
            std::fs::create_dir(&volume_upper).map_err(io_err("import"))?;
            std::fs::create_dir(scratch.join("work")).map_err(io_err("import"))?;
            let file = std::fs::File::open(archive).map_err(io_err("import"))?;
            let zst = zstd::stream::read::Decoder::new(file).map_err(|e| bad(e.to_string()))?;
            let mut outer = tar::Archive::new(devbox_image::extract::guarded(zst));
            let mut manifest = None;
            let mut layer = None;
            for entry in outer.entries().map_err(|e| bad(e.to_string()))? {
                let mut entry = entry.map_err(|e| bad(e.to_string()))?;
                let path = entry
                    .path()
                    .map_err(|e| bad(e.to_string()))?
                    .to_string_lossy()
                    .to_string();
                match path.as_str() {
                    "manifest.json" if manifest.is_none() && layer.is_none() => {
                        // Refused by its declared size: the tar reader would otherwise
                        // inflate what the read below leaves, to skip it.
                        if entry.size() > MAX_MANIFEST {
                            return Err(bad(format!(
                                "manifest.json declares {} bytes, more than a manifest may be ({MAX_MANIFEST})",
                                entry.size()
                            )));
                        }
                        let mut text = Vec::new();
                        (&mut entry)
                            .take(MAX_MANIFEST)
                            .read_to_end(&mut text)
                            .map_err(|e| bad(e.to_string()))?;
                        let m = serde_json::from_slice::<ArchiveManifest>(&text)
                            .map_err(|e| bad(format!("manifest.json: {e}")))?;
                        // Everything the manifest says is checked before the layer is read.
                        self.check_archive_manifest(&m)?;
                        manifest = Some(m);
                    }
                    "layer.tar" if layer.is_none() => {
                        let Some(m) = manifest.as_ref() else {
                            return Err(bad(
                                "layer.tar comes before manifest.json (an export writes the manifest first)"
                                    .into(),
                            ));
                        };
                        // The manifest's size, before a byte is inflated: everything read
                        // of layer.tar then is the extractor's, within the budget.
                        if entry.size() != m.layer.size {
                            return Err(EngineError::InvalidRequest(format!(
                                "the snapshot archive is corrupted: layer.tar is {} bytes, the manifest says {}",
                                entry.size(),
                                m.layer.size
                            )));
                        }
                        let mut reader = HashingReader {
                            inner: entry,
                            hasher: Sha256::new(),
                            count: 0,
                        };
                        let opts = devbox_image::extract::ExtractOptions {
                            whiteouts: false,
                            overlay_layer: true,
                        };
                        devbox_image::extract::extract(
                            &mut reader,
                            &volume_upper,
                            opts,
                            &mut budget,
                        )
                        .map_err(|err| match err {
                            e2 if e2.is_full() => {
                                EngineError::PoolFull(self.pool.full().to_string())
                            }
                            e2 => EngineError::InvalidRequest(format!(
                                "not a valid snapshot archive: {e2}"
                            )),
                        })?;
                        // The extractor read layer.tar to its end (what follows its
                        // end-of-archive marker is bounded to 10 KiB): nothing is left to
                        // hash, and nothing is read unbounded.
                        let mut rest = [0u8; 1];
                        if reader.read(&mut rest).map_err(|e| bad(e.to_string()))? != 0 {
                            return Err(bad("layer.tar has data after its end".into()));
                        }
                        layer = Some((
                            format!("sha256:{}", hex::encode(reader.hasher.finalize())),
                            reader.count,
                        ));
                    }
                    other => return Err(bad(format!("unexpected entry {other:?}"))),
                }
            }
            let manifest = manifest.ok_or_else(|| bad("no manifest.json".into()))?;
            let (digest, size) = layer.ok_or_else(|| bad("no layer.tar".into()))?;
            if manifest.layer.digest != digest || manifest.layer.size != size {
                return Err(EngineError::InvalidRequest(format!(
                    "the snapshot archive is corrupted: layer.tar has digest {digest} ({size} bytes), the manifest says {} ({} bytes)",
                    manifest.layer.digest, manifest.layer.size
                )));
            }
            Ok((manifest, digest, size))
        })();
        let (manifest, _, _) = match result {
            Ok(v) => v,
            Err(err) => {
                let _ = self.pool.delete_volume(&scratch);
                return Err(err);
            }
        };
        let adopted = self.adopt_imported(caller, &scratch, manifest, name, start);
        if adopted.is_err() {
            let _ = self.pool.delete_volume(&scratch);
        }
        adopted
    }

    /// Checks an archive's manifest before anything of the archive is written: its format,
    /// and its sandbox spec with the validation `create` applies (limits within the range
    /// the daemon accepts; nothing is clamped).
    fn check_archive_manifest(&self, m: &ArchiveManifest) -> Result<()> {
        if m.format != SNAPSHOT_FORMAT {
            return Err(EngineError::InvalidRequest(format!(
                "not a valid snapshot archive: format {:?}, expected {SNAPSHOT_FORMAT:?}",
                m.format
            )));
        }
        m.sandbox.manifest.validate().map_err(|e| {
            EngineError::InvalidRequest(format!(
                "the snapshot archive's sandbox spec is not accepted: {e}"
            ))
        })?;
        Ok(())
    }

    /// Turns an extracted, verified layer into a sandbox with one snapshot.
    fn adopt_imported(
        self: &Arc<Self>,
        caller: &Caller,
        volume: &std::path::Path,
        am: ArchiveManifest,
        name: Option<String>,
        start: bool,
    ) -> Result<SandboxInfo> {
        let image_id = if am.image.id == HOST_IMAGE {
            HOST_IMAGE.to_string()
        } else if self.store.images()?.iter().any(|i| i.id == am.image.id) {
            am.image.id.clone()
        } else {
            return Err(EngineError::InvalidRequest(format!(
                "the snapshot sits on image {} ({}), which is not here: import that image first",
                am.image.name,
                &am.image.id[..am.image.id.len().min(12)]
            )));
        };
        let name = Name::new(name.as_deref().unwrap_or(&am.sandbox.name))?;
        let mut manifest = am.sandbox.manifest.clone();
        manifest.metadata.name = Some(name.to_string());
        let lock = self.locks.get(name.as_str());
        let _guard = lock.blocking_lock();
        let mut rec = self.insert_creating(name.to_string(), &manifest, image_id, false, None)?;
        let made = (|| -> Result<()> {
            std::fs::rename(volume, self.sandbox_volume(&rec.id)).map_err(io_err("import"))?;
            rec.state = SandboxState::Stopped;
            self.store.update_sandbox(&rec)?;
            let snap = self.snapshot_locked(
                &mut rec,
                crate::model::SnapshotRequest {
                    name: Some(am.snapshot.name.clone()),
                    message: am.snapshot.message.clone(),
                    labels: am.snapshot.labels.clone(),
                    with_processes: false,
                },
                false,
            )?;
            debug_assert_eq!(snap.state, SnapshotState::Ready);
            if start {
                self.launch(caller, &mut rec, &manifest)?;
            }
            Ok(())
        })();
        if let Err(err) = made {
            for s in self.store.snapshots_of(&rec.id).unwrap_or_default() {
                let _: std::result::Result<(), EngineError> = self.remove_snapshot(s);
            }
            self.discard(&rec);
            return Err(err);
        }
        self.info(&rec, false)
    }
}
