//! [`Store`]: uploaded CSV files, stored in chunks (the same SQL on both dialects).

use super::{on_pool, Store};

impl Store {
    /// Starts an upload with this id.
    pub async fn create_upload(&self, id: &str) -> anyhow::Result<()> {
        on_pool!(self, p => sqlx::query("INSERT INTO uploads (id) VALUES ($1)").bind(id).execute(p).await.map(drop))?;
        Ok(())
    }

    /// Appends chunk number `seq` (0-based) of an upload.
    pub async fn append_upload_chunk(&self, id: &str, seq: i32, data: &[u8]) -> anyhow::Result<()> {
        const SQL: &str = "INSERT INTO upload_chunks (upload_id, seq, data) VALUES ($1, $2, $3)";
        on_pool!(self, p => sqlx::query(SQL).bind(id).bind(seq).bind(data).execute(p).await.map(drop))?;
        Ok(())
    }

    /// Marks an upload complete with its size in bytes and SHA-256 (hex).
    pub async fn finish_upload(&self, id: &str, size_bytes: i64, sha256: &str) -> anyhow::Result<()> {
        const SQL: &str = "UPDATE uploads SET size_bytes = $2, sha256 = $3, complete = TRUE WHERE id = $1";
        on_pool!(self, p => sqlx::query(SQL).bind(id).bind(size_bytes).bind(sha256).execute(p).await.map(drop))?;
        Ok(())
    }

    /// Deletes an upload and its chunks.
    pub async fn delete_upload(&self, id: &str) -> anyhow::Result<()> {
        on_pool!(self, p => {
            sqlx::query("DELETE FROM upload_chunks WHERE upload_id = $1").bind(id).execute(p).await?;
            sqlx::query("DELETE FROM uploads WHERE id = $1").bind(id).execute(p).await?;
        });
        Ok(())
    }

    /// Chunk `seq` of a complete upload, `None` past the end; errors when the upload is missing or incomplete.
    pub async fn upload_chunk(&self, id: &str, seq: i32) -> anyhow::Result<Option<Vec<u8>>> {
        if seq == 0 {
            let complete: Option<(bool,)> = on_pool!(self, p => sqlx::query_as("SELECT complete FROM uploads WHERE id = $1").bind(id).fetch_optional(p).await)?;
            match complete {
                None => return Err(UploadMissing(format!("upload {id} does not exist")).into()),
                Some((false,)) => return Err(UploadMissing(format!("upload {id} is not complete")).into()),
                Some((true,)) => {}
            }
        }
        const SQL: &str = "SELECT data FROM upload_chunks WHERE upload_id = $1 AND seq = $2";
        let row: Option<(Vec<u8>,)> =
            on_pool!(self, p => sqlx::query_as(SQL).bind(id).bind(seq).fetch_optional(p).await)?;
        Ok(row.map(|r| r.0))
    }
}

/// The error of [`Store::upload_chunk`] when the upload does not exist or was
/// never completed: the import's source is wrong, not the database.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UploadMissing(pub String);
