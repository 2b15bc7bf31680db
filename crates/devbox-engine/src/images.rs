//! Image operations: import, list, remove.

use std::path::PathBuf;
use std::sync::Arc;

use devbox_image::HOST_IMAGE;
use devbox_store::{ImageRecord, StoreError, now_ms};
use devbox_wire::ImageConfig;

use crate::model::{ImageInfo, ImportImageRequest, rfc3339};
use crate::{Caller, Engine, EngineError, Result};

fn format_name(f: devbox_image::ImageFormat) -> String {
    serde_json::to_string(&f)
        .unwrap_or_default()
        .trim_matches('"')
        .to_string()
}

impl Engine {
    /// Imports an image from a path on this host.
    pub async fn import_image(
        self: &Arc<Self>,
        caller: &Caller,
        req: ImportImageRequest,
    ) -> Result<ImageInfo> {
        let detail = serde_json::json!({"path": req.path, "name": req.name});
        let r = self.blocking(move |e| e.import_blocking(req)).await;
        let mut d = detail;
        if let Ok(i) = &r {
            d["id"] = i.id.clone().into();
        }
        self.audit_result(caller, "image.import", None, d, &r);
        r
    }

    fn import_blocking(&self, req: ImportImageRequest) -> Result<ImageInfo> {
        let path = PathBuf::from(&req.path);
        if !path.is_absolute() {
            return Err(EngineError::InvalidRequest(format!(
                "image path {:?} must be absolute",
                req.path
            )));
        }
        if !path.exists() {
            return Err(EngineError::InvalidRequest(format!(
                "{} does not exist",
                path.display()
            )));
        }
        if let Some(n) = &req.name {
            validate_image_name(n)?;
            if self.store.find_image(n)?.is_some() || n == HOST_IMAGE {
                return Err(EngineError::AlreadyExists {
                    kind: "image",
                    name: n.clone(),
                });
            }
        }
        let imported = self.images.import(&path)?;
        if let Some(existing) = self
            .store
            .images()?
            .into_iter()
            .find(|i| i.id == imported.id)
        {
            return self.image_info(existing);
        }
        let name = match req.name {
            Some(n) => n,
            None => {
                let hint = imported
                    .name_hint
                    .clone()
                    .unwrap_or_else(|| imported.id[..12].to_string());
                let hint: String = hint
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || "._:-/".contains(c) {
                            c
                        } else {
                            '-'
                        }
                    })
                    .collect();
                if self.store.find_image(&hint)?.is_some() {
                    imported.id[..12].to_string()
                } else {
                    hint
                }
            }
        };
        let rec = ImageRecord {
            id: imported.id.clone(),
            name,
            format: format_name(imported.format),
            config: serde_json::to_string(&imported.config)
                .map_err(|e| EngineError::internal("image config", e))?,
            size_bytes: imported.size_bytes,
            created_at: now_ms(),
            source: path.display().to_string(),
        };
        if let Err(e) = self.store.insert_image(&rec) {
            if !imported.existed {
                let _ = self.pool.delete_volume(&self.images.path(&imported.id));
            }
            return Err(match e {
                StoreError::Conflict(_) => EngineError::AlreadyExists {
                    kind: "image",
                    name: rec.name,
                },
                other => other.into(),
            });
        }
        self.image_info(rec)
    }

    fn image_info(&self, rec: ImageRecord) -> Result<ImageInfo> {
        let used_by = self.store.sandboxes_using_image(&rec.id)?;
        Ok(ImageInfo {
            config: serde_json::from_str(&rec.config).unwrap_or_default(),
            id: rec.id,
            name: rec.name,
            format: rec.format,
            size_bytes: rec.size_bytes,
            created_at: rfc3339(rec.created_at),
            source: rec.source,
            used_by,
        })
    }

    fn host_image_info(&self) -> Result<ImageInfo> {
        Ok(ImageInfo {
            id: HOST_IMAGE.into(),
            name: HOST_IMAGE.into(),
            format: format_name(devbox_image::ImageFormat::Host),
            size_bytes: 0,
            created_at: String::new(),
            source: "the host's /usr (read-only) and a copy of its world-readable /etc".into(),
            config: ImageConfig::default(),
            used_by: self.store.sandboxes_using_image(HOST_IMAGE)?,
        })
    }

    /// Every image, the host image first.
    pub async fn list_images(self: &Arc<Self>) -> Result<Vec<ImageInfo>> {
        self.blocking(|e| {
            let mut out = vec![e.host_image_info()?];
            for rec in e.store.images()? {
                out.push(e.image_info(rec)?);
            }
            Ok(out)
        })
        .await
    }

    /// Removes an image; refused while a sandbox uses it.
    pub async fn remove_image(self: &Arc<Self>, caller: &Caller, reference: &str) -> Result<()> {
        let reference = reference.to_string();
        let audit_detail = serde_json::json!({"image": reference});
        let r = self
            .blocking(move |e| {
                if reference == HOST_IMAGE {
                    return Err(EngineError::InvalidRequest(
                        "the host image is built in and cannot be removed".into(),
                    ));
                }
                let rec = e
                    .store
                    .find_image(&reference)?
                    .ok_or_else(|| EngineError::image_not_found(&reference))?;
                let users = e.store.sandboxes_using_image(&rec.id)?;
                if !users.is_empty() {
                    return Err(EngineError::ImageInUse {
                        image: rec.name,
                        sandboxes: users,
                    });
                }
                e.store.delete_image(&rec.id)?;
                e.pool.set_readonly(&e.images.path(&rec.id), false)?;
                e.pool.delete_volume(&e.images.path(&rec.id))?;
                Ok(())
            })
            .await;
        self.audit_result(caller, "image.remove", None, audit_detail, &r);
        r
    }
}

fn validate_image_name(n: &str) -> Result<()> {
    let ok = !n.is_empty()
        && n.len() <= 128
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._:-/".contains(c))
        && n.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(EngineError::InvalidRequest(format!(
            "{n:?} is not a valid image name: use up to 128 letters, digits and . _ : - /, starting with a letter or digit"
        )))
    }
}
