//! The chaos run on the production topology: a 3-node nats-server cluster
//! with R3 streams, two of each service, authentication on. See
//! `e2e::chaos` for the workload, the fault schedule and the checks.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_keeps_every_promise_through_the_fault_schedule() {
    e2e::chaos::run(true).await;
}
