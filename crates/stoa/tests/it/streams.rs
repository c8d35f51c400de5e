//! The output stream: replay for late readers, resume without gaps or duplicates.

use stoa_types::RunStatus;

use super::*;

const LINES: usize = 300;

fn counting_code() -> String {
    format!("for i in range({LINES}):\n    print(f'line {{i}}')\n")
}

fn expected() -> String {
    (0..LINES).map(|i| format!("line {i}\n")).collect()
}

#[tokio::test]
async fn late_reader_gets_everything_and_one_job_finished() {
    let s = TestServer::start().await;
    let (id, url) = s.start_code(&counting_code()).await;
    assert_status(&s.wait_end(&id).await, RunStatus::Completed);
    // The run ended before this reader came.
    let (text, events) = read_stream(&s.client, &url, None).await;
    assert_eq!(text, expected());
    assert_eq!(finished(&events).job.result.return_code, Some(0));
    // Every event carries an id; output ids are 1..=N in order.
    let ids: Vec<String> = events
        .iter()
        .map(|e| e.id.clone().expect("every event has an id"))
        .collect();
    let output_ids: Vec<i64> = events
        .iter()
        .filter(|e| matches!(e.event, StreamEvent::Output(_)))
        .map(|e| e.id.as_ref().unwrap().parse().unwrap())
        .collect();
    assert_eq!(output_ids, (1..=LINES as i64).collect::<Vec<_>>());
    assert_eq!(ids.last().unwrap(), "end");
    // The fallback URL (what `lyceum docker logs` uses) serves the same stream.
    let (text2, _) = read_stream(&s.client, &s.client.stream_url(&id), None).await;
    assert_eq!(text2, text);
}

#[tokio::test]
async fn resume_with_last_event_id_has_no_gap_and_no_duplicate() {
    let s = TestServer::start().await;
    let code = format!(
        "import time\n{}\ntime.sleep(0.5)\nprint('tail')\n",
        counting_code()
    );
    let (id, url) = s.start_code(&code).await;
    // Read part of the live stream, then drop the connection.
    let mut first = String::new();
    let mut last_id = None;
    {
        let mut st = s.client.stream(&url, None).await.unwrap();
        while let Some(ev) = st.next().await {
            let ev = ev.unwrap();
            if let StreamEvent::Output(o) = &ev.event {
                first.push_str(&o.content);
                last_id = ev.id.clone();
                if first.lines().count() == 100 {
                    break;
                }
            }
        }
    }
    let (rest, events) = read_stream(&s.client, &url, last_id.as_deref()).await;
    assert_eq!(format!("{first}{rest}"), format!("{}tail\n", expected()));
    assert_eq!(finished(&events).job.result.return_code, Some(0));
    assert_status(&s.wait_end(&id).await, RunStatus::Completed);
}

#[tokio::test]
async fn unknown_stream_is_404() {
    let s = TestServer::start().await;
    let err = s
        .client
        .stream(
            &s.client.stream_url("01a22a22-0000-7000-8000-000000000000"),
            None,
        )
        .await
        .err()
        .unwrap();
    assert_eq!(err.status(), Some(404));
}

#[tokio::test]
async fn waiting_run_streams_its_pending_reason() {
    let s = TestServer::start_with(|c| c.worker.enabled = false).await;
    let (_, url) = s.start_code("print(1)").await;
    let mut st = s.client.stream(&url, None).await.unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(10), st.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    match ev.event {
        StreamEvent::Status(st) => {
            assert_eq!(st.status, RunStatus::Pending);
            assert!(st.pending_reason.unwrap().contains("no worker is enabled"));
        }
        other => panic!("expected a status event, got {other:?}"),
    }
}
