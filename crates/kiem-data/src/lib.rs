//! Data for kiem: corpus readers (plain text, JSONL, Parquet; optionally gzip/zstd compressed),
//! token shards in llm.c's format, and `prepare`, which turns a corpus into shards.

pub mod chat;
pub mod corpus;
mod error;
pub mod prepare;
pub mod shard;

pub use error::{DataError, Location, Position, Result};
