//! How an image is laid out in the `scan_images` object store.

use async_nats::jetstream;
use axum::body::Bytes;

/// Chunk size in the object store; under the server's default max payload
/// of 1 MiB.
const OBJECT_CHUNK: usize = 512 * 1024;

/// Stores `bytes` as object `name`, laid out exactly as async-nats'
/// `ObjectStore::put` does (chunks on `$O.<bucket>.C.<nuid>`, then the object
/// info on `$O.<bucket>.M.<base64url(name)>` with a subject rollup), so any
/// object-store client reads it back. The difference: every chunk is in
/// flight at once and the acks are awaited together, where the library
/// waits one round trip per chunk; on a 5 MB photo that is most of the
/// upload's latency. The info is published only after every chunk is
/// stored, so a reader never sees a partial object.
pub(crate) async fn put_object(
    js: &jetstream::Context,
    bucket: &str,
    name: &str,
    bytes: &Bytes,
) -> anyhow::Result<()> {
    use base64::Engine as _;
    use jetstream::object_store::{ObjectInfo, ObjectOptions};
    use sha2::Digest as _;

    let hashing = {
        let bytes = bytes.clone();
        tokio::task::spawn_blocking(move || sha2::Sha256::digest(&bytes))
    };
    let nuid = uuid::Uuid::new_v4().simple().to_string();
    let chunk_subject = format!("$O.{bucket}.C.{nuid}");
    let mut acks = Vec::with_capacity(bytes.len().div_ceil(OBJECT_CHUNK));
    let mut offset = 0;
    while offset < bytes.len() {
        let end = (offset + OBJECT_CHUNK).min(bytes.len());
        acks.push(
            js.publish(chunk_subject.clone(), bytes.slice(offset..end))
                .await?,
        );
        offset = end;
    }
    let chunks = acks.len();
    let acks = acks.into_iter().map(std::future::IntoFuture::into_future);
    if let Err(e) = futures::future::try_join_all(acks).await {
        // Chunks without an info are invisible but take space: drop them.
        if let Ok(stream) = js.get_stream(format!("OBJ_{bucket}")).await {
            let _ = stream.purge().filter(&chunk_subject).await;
        }
        return Err(e.into());
    }
    let digest = hashing.await?;
    let info = ObjectInfo {
        name: name.to_owned(),
        description: None,
        metadata: Default::default(),
        headers: None,
        options: Some(ObjectOptions {
            link: None,
            max_chunk_size: Some(OBJECT_CHUNK),
        }),
        bucket: bucket.to_owned(),
        nuid,
        size: bytes.len(),
        chunks,
        modified: None,
        digest: Some(format!(
            "SHA-256={}",
            base64::engine::general_purpose::URL_SAFE.encode(digest)
        )),
        deleted: false,
    };
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Rollup", "sub");
    let meta_subject = format!(
        "$O.{bucket}.M.{}",
        base64::engine::general_purpose::URL_SAFE.encode(name)
    );
    js.publish_with_headers(meta_subject, headers, serde_json::to_vec(&info)?.into())
        .await?
        .await?;
    Ok(())
}
