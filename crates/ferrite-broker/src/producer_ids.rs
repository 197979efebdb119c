//! Producer id allocation for InitProducerId. Ids come in blocks claimed through the
//! metadata log (a `ProducerIds` record, as KRaft's controller hands out blocks to
//! brokers), so an id is never handed out twice, not even across restarts or, later,
//! across brokers: the record is durable before any id of its block is used, and a
//! restart claims a fresh block past every block ever claimed.

use ferrite_metadata::MetadataRecord;
use ferrite_raft::QuorumError;

use kafka_protocol::messages::{AllocateProducerIdsRequest, BrokerId};

use crate::controller::Controller;
use crate::controller_rpc::{ControllerChannel, ControllerRequest, ControllerResponse};

/// Ids claimed per metadata record (Kafka's `ProducerIdsBlock.PRODUCER_ID_BLOCK_SIZE`).
pub const PRODUCER_ID_BLOCK_SIZE: i64 = 1000;

#[derive(Debug, thiserror::Error)]
pub enum ProducerIdError {
    #[error("cannot claim a block of producer ids: {0}")]
    Metadata(#[from] QuorumError),
    #[error("producer ids are exhausted")]
    Exhausted,
    #[error("the controller refused a block of producer ids (error code {0})")]
    Refused(i16),
    #[error("no controller answered for a block of producer ids: {0}")]
    Unavailable(String),
}

/// The block this broker hands ids out of: `[next, end)`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProducerIdBlock {
    next: i64,
    end: i64,
}

impl ProducerIdBlock {
    /// The next id, or `None` when the block is used up.
    pub fn take(&mut self) -> Option<i64> {
        (self.next < self.end).then(|| {
            self.next += 1;
            self.next - 1
        })
    }
}

#[derive(Default)]
pub struct ProducerIdManager {
    block: tokio::sync::Mutex<ProducerIdBlock>,
}

impl ProducerIdManager {
    /// A producer id never handed out before. A new block comes from the active
    /// controller (Kafka's AllocateProducerIds; in-process when this node is it).
    pub async fn generate(
        &self,
        controller: &Controller,
        broker_id: i32,
    ) -> Result<i64, ProducerIdError> {
        let mut block = self.block.lock().await;
        if let Some(id) = block.take() {
            return Ok(id);
        }
        let mut channel = ControllerChannel::new(
            controller.quorum().local_addr().ip(),
            controller.quorum().write_timeout(),
        );
        let req = ControllerRequest::AllocateProducerIds(
            AllocateProducerIdsRequest::default()
                .with_broker_id(BrokerId(broker_id))
                .with_broker_epoch(-1),
        );
        let (start, len) = match channel.call(controller, req).await {
            Ok(ControllerResponse::AllocateProducerIds(r)) if r.error_code == 0 => {
                (r.producer_id_start.0, i64::from(r.producer_id_len))
            }
            Ok(ControllerResponse::AllocateProducerIds(r)) => {
                return Err(ProducerIdError::Refused(r.error_code))
            }
            Ok(_) => return Err(ProducerIdError::Unavailable("unexpected answer".into())),
            Err(e) => return Err(ProducerIdError::Unavailable(e)),
        };
        let end = start.checked_add(len).ok_or(ProducerIdError::Exhausted)?;
        tracing::info!(start, end, "got a block of producer ids");
        *block = ProducerIdBlock { next: start, end };
        block.take().ok_or(ProducerIdError::Exhausted)
    }
}

/// On the active controller: claims the next block of producer ids through the metadata
/// log (durable before any id of it is used) and returns its first id.
pub async fn allocate_block(
    controller: &Controller,
    broker_id: i32,
    broker_epoch: i64,
) -> Result<i64, ProducerIdError> {
    let mut writer = controller.writer().await;
    let start = writer.image().next_producer_id();
    let end = start
        .checked_add(PRODUCER_ID_BLOCK_SIZE)
        .ok_or(ProducerIdError::Exhausted)?;
    // Decided on the active controller only (the commit refuses elsewhere): a block
    // decided on a stale image elsewhere could overlap another broker's.
    writer
        .commit(vec![MetadataRecord::ProducerIds {
            broker_id,
            broker_epoch,
            next_producer_id: end,
        }])
        .await?;
    tracing::info!(broker_id, start, end, "claimed a block of producer ids");
    Ok(start)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn ids_are_unique_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let open = || {
            rt.block_on(async {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let addr = listener.local_addr().unwrap();
                let voter = ferrite_raft::Voter {
                    id: 0,
                    host: "127.0.0.1".into(),
                    port: addr.port(),
                };
                let q = ferrite_raft::MetadataQuorum::start_with(
                    ferrite_raft::QuorumConfig::new(0, addr, vec![voter], dir.path().into()),
                    Some(listener),
                )
                .await
                .unwrap();
                let mut status = q.status_watch();
                status.wait_for(|s| s.is_active_controller).await.unwrap();
                q.read_barrier().await.unwrap();
                Controller::new(Arc::new(q))
            })
        };
        let mut seen = std::collections::BTreeSet::new();
        for _restart in 0..3 {
            let controller = open();
            let ids = ProducerIdManager::default();
            for _ in 0..(PRODUCER_ID_BLOCK_SIZE + 5) {
                let id = rt.block_on(ids.generate(&controller, 0)).unwrap();
                assert!(seen.insert(id), "id {id} handed out twice");
            }
            rt.block_on(controller.quorum().shutdown());
        }
        // Three restarts, each using one block and five ids of the next.
        assert_eq!(seen.len() as i64, 3 * (PRODUCER_ID_BLOCK_SIZE + 5));
        let controller = open();
        assert_eq!(
            controller.image().next_producer_id(),
            6 * PRODUCER_ID_BLOCK_SIZE
        );
    }
}
