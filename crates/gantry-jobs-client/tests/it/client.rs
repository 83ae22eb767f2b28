//! `Client` calls against the server, with and without a worker.

use std::time::Duration;

use gantry_jobs_client::{ClientError, EnqueueOptions, JobStatus, ListFilter, ListOrder, NewJob};
use serde::{Deserialize, Serialize};

use crate::server::{Server, add, spawn};

const WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Invoice {
    customer: String,
    cents: u64,
}

#[derive(Debug, PartialEq, Deserialize)]
struct Receipt {
    number: String,
    total: f64,
}

#[tokio::test]
async fn typed_round_trip_through_a_worker() {
    let server = Server::start().await;
    let client = server.client().await;
    let worker = spawn(
        server
            .worker()
            .handler("math:add", add)
            .handler("invoice:send", |(invoice,): (Invoice,)| async move {
                Ok::<_, gantry_jobs_client::HandlerError>(serde_json::json!({
                    "number": format!("{}-1", invoice.customer),
                    "total": invoice.cents as f64 / 100.0,
                }))
            })
            .build()
            .unwrap(),
    );

    let job = client
        .enqueue("math:add", &(2, 3), EnqueueOptions::default())
        .await
        .unwrap();
    assert!(!job.deduplicated);
    assert_eq!(client.result::<i64>(&job.id, WAIT).await.unwrap(), 5);

    let invoice = Invoice {
        customer: "acme".into(),
        cents: 1250,
    };
    let job = client
        .enqueue("invoice:send", &(&invoice,), EnqueueOptions::default())
        .await
        .unwrap();
    let receipt: Receipt = client.result(&job.id, WAIT).await.unwrap();
    assert_eq!(
        receipt,
        Receipt {
            number: "acme-1".into(),
            total: 12.5
        }
    );

    // The stored job, in the SDK's own types.
    let stored = client.get(&job.id).await.unwrap();
    assert_eq!(stored.status, JobStatus::Success);
    assert_eq!((stored.attempt, stored.max_attempts), (1, 3));
    assert_eq!(stored.args::<(Invoice,)>().unwrap().0, invoice);
    assert_eq!(
        stored.result::<serde_json::Value>().unwrap().unwrap()["number"],
        "acme-1"
    );
    assert!(stored.completed_at.unwrap() >= stored.started_at.unwrap());
    assert_eq!(stored.error, None);

    // A batch, all or nothing, answered in order.
    let batch = (0..5)
        .map(|i| NewJob::new("math:add", &(i, 10)))
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let ids = client.enqueue_batch(batch).await.unwrap();
    assert_eq!(ids.len(), 5);
    for (i, job) in ids.iter().enumerate() {
        assert_eq!(
            client.result::<i64>(&job.id, WAIT).await.unwrap(),
            i as i64 + 10
        );
    }
    // Waiting on a finished job answers at once.
    let done = client.wait(&ids[0].id, WAIT).await.unwrap();
    assert_eq!(done.status, JobStatus::Success);

    let page = client
        .list(ListFilter {
            names: vec!["math:add".into()],
            statuses: vec![JobStatus::Success],
            limit: 2,
            order: ListOrder::CreatedAt,
            ascending: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!((page.jobs.len(), page.total), (2, 6));
    assert_eq!(page.jobs[0].args::<(i64, i64)>().unwrap(), (2, 3));
    let stats = client.stats().await.unwrap();
    assert_eq!((stats.success, stats.total()), (7, 7));

    worker.stop().await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn client_calls_without_a_worker() {
    let server = Server::start().await;
    let client = server.client().await;

    // Idempotency keys deduplicate.
    let options = EnqueueOptions {
        idempotency_key: Some("order-7".into()),
        delay: Some(Duration::from_secs(60)),
        priority: Some(3),
        queue: Some("mail".into()),
        ..Default::default()
    };
    let first = client
        .enqueue("mail:send", &("a@example.com",), options.clone())
        .await
        .unwrap();
    let again = client
        .enqueue("mail:send", &("a@example.com",), options)
        .await
        .unwrap();
    assert!(again.deduplicated && !first.deduplicated);
    assert_eq!(again.id, first.id);
    let job = client.get(&first.id).await.unwrap();
    assert_eq!(job.status, JobStatus::Pending);
    assert_eq!((job.priority, job.queue.as_str()), (3, "mail"));
    assert_eq!(job.idempotency_key.as_deref(), Some("order-7"));
    assert!(job.scheduled_at > job.created_at + Duration::from_secs(50));

    // Waiting for a job nobody runs times out.
    let e = client
        .wait(&first.id, Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::Timeout { .. }), "{e}");

    // Cancel a pending job: a typed error for its result; it cannot be retried.
    let cancelled = client.cancel(&first.id).await.unwrap();
    assert!(cancelled.accepted, "{}", cancelled.message);
    let e = client.result::<()>(&first.id, WAIT).await.unwrap_err();
    assert!(
        matches!(&e, ClientError::Cancelled { id } if *id == first.id),
        "{e}"
    );
    assert!(!client.cancel(&first.id).await.unwrap().accepted);
    let retried = client.retry(&first.id).await.unwrap();
    assert!(!retried.accepted, "{}", retried.message);

    let cancelled = client
        .list(ListFilter {
            statuses: vec![JobStatus::Cancelled],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(cancelled.total, 1);

    // Unknown ids and refused input have their own errors.
    assert!(matches!(
        client.get("no-such-job").await.unwrap_err(),
        ClientError::NotFound(id) if id == "no-such-job"
    ));
    assert!(matches!(
        client.wait("no-such-job", WAIT).await.unwrap_err(),
        ClientError::NotFound(_)
    ));
    let e = client
        .enqueue("", &(), EnqueueOptions::default())
        .await
        .unwrap_err();
    match &e {
        ClientError::Rpc { call, status } => {
            assert_eq!(
                (*call, status.code()),
                ("EnqueueJob", tonic::Code::InvalidArgument)
            );
            assert!(e.to_string().contains("name: must not be empty"), "{e}");
        }
        other => panic!("expected an RPC error, got {other}"),
    }
    let e = client
        .enqueue(
            "n",
            &(),
            EnqueueOptions {
                timeout: Some(Duration::from_secs(1 << 40)),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::InvalidOptions {
                field: "timeout",
                ..
            }
        ),
        "{e}"
    );
    let e = client
        .enqueue_batch(vec![
            NewJob::new("ok", &()).unwrap(),
            NewJob::new("", &()).unwrap(),
        ])
        .await
        .unwrap_err();
    assert!(e.to_string().contains("jobs[1].name"), "{e}");
    assert_eq!(
        client.stats().await.unwrap().total(),
        1,
        "nothing of the refused batch"
    );

    // Connecting to nothing fails at once; a lazy client fails on its first call.
    server.stop().await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap().to_string();
    drop(closed);
    assert!(matches!(
        gantry_jobs_client::Client::connect(&addr)
            .await
            .unwrap_err(),
        ClientError::Connect { .. }
    ));
    let lazy = gantry_jobs_client::Client::connect_lazy(&addr).unwrap();
    assert!(matches!(
        lazy.stats().await.unwrap_err(),
        ClientError::Rpc { status, .. } if status.code() == tonic::Code::Unavailable
    ));
    assert!(matches!(
        gantry_jobs_client::Client::connect_lazy("http://bad host").unwrap_err(),
        ClientError::InvalidAddress { .. }
    ));
}
