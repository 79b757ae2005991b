//! Keeping a JetStream delivery leased while its work runs.
//!
//! A worker that holds a message tells the server it is still working
//! (`+WPI`) well inside the consumer's ack wait, from the moment it receives
//! the message until it is done with it, whatever it is waiting on (an
//! upstream being connected or retried, a slow stage). Only a worker that is
//! dead or frozen stops renewing, and only then is the message redelivered.

use std::time::Duration;

use async_nats::jetstream;

/// Renews the lease of one delivery until dropped.
#[must_use = "the lease ends when this is dropped"]
pub struct Lease(tokio::task::JoinHandle<()>);

impl Lease {
    /// Starts renewing `message` every `every` (a third of the ack wait is usual).
    pub fn keep(
        client: &async_nats::Client,
        message: &jetstream::Message,
        every: Duration,
    ) -> Self {
        let client = client.clone();
        let reply = message.reply.clone();
        Self(tokio::spawn(async move {
            let Some(reply) = reply else { return };
            loop {
                tokio::time::sleep(every).await;
                let _ = client.publish(reply.clone(), "+WPI".into()).await;
            }
        }))
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.abort();
    }
}
