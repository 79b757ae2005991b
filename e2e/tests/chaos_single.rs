//! The chaos run's schedule on a single nats-server (R1): the same
//! promises must hold as on the cluster. See `e2e::chaos`.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_node_keeps_every_promise_through_the_fault_schedule() {
    e2e::chaos::run(false).await;
}
