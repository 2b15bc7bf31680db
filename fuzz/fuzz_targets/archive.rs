//! cargo fuzz run archive: any bytes as an archive the daemon imports (a snapshot layer, a
//! rootfs tarball, an OCI or docker image archive) must not panic or hang, and never write
//! outside the scratch directory or beyond the budget.
#![no_main]

use std::path::Path;

use devbox_image::extract::{self, Budget, ExtractOptions};
use libfuzzer_sys::fuzz_target;

const LIMIT: u64 = 64 << 20;

fuzz_target!(|data: &[u8]| {
    let Ok(tmp) = tempfile::tempdir() else {
        return;
    };
    // As a layer: an OCI layer (whiteouts) and a snapshot's overlay layer.
    for opts in [
        ExtractOptions {
            whiteouts: true,
            overlay_layer: false,
        },
        ExtractOptions {
            whiteouts: false,
            overlay_layer: true,
        },
    ] {
        let root = tmp.path().join(format!("layer-{}", opts.whiteouts));
        if std::fs::create_dir(&root).is_err() {
            return;
        }
        if let Ok(reader) = extract::decompressed(data) {
            let _ = extract::extract(reader, &root, opts, &mut Budget::new(LIMIT, LIMIT));
        }
    }
    // As an image archive, through the store's import (copy-driver pool in the scratch dir).
    let Ok(pool) = devbox_storage::Pool::open(
        &devbox_storage::PoolSource::Directory(tmp.path().join("pool")),
        Path::new("/nonexistent"),
    ) else {
        return;
    };
    let store = devbox_image::ImageStore::new(pool);
    let source = tmp.path().join("image.tar");
    if std::fs::write(&source, data).is_err() {
        return;
    }
    let _ = store.import_within(&source, Budget::new(LIMIT, LIMIT));
});
