//! The data plane's rules through the orchestrator, against simulated agents (no root needed):
//! 404 unknown sandbox, 409 not Running, 502 unreachable agent, 400 bad requests, 501 for files on
//! the simulator, and the simulator's built-in commands.

mod common;

use common::*;
use futures::StreamExt;
use sandboxd_api::dataplane::ExecRequest;
use sandboxd_api::Phase;
use sandboxd_client::dataplane::ExecOutput;
use std::time::Duration;

fn request(command: &[&str]) -> ExecRequest {
    ExecRequest { command: command.iter().map(|s| s.to_string()).collect(), ..ExecRequest::default() }
}

async fn running_sandbox(client: &sandboxd_client::Client, id: &str) {
    client.create_sandbox(id, &sandbox_spec("100m")).await.unwrap();
    eventually(20, "Running", || async {
        client.get_sandbox(id).await.ok().filter(|s| s.status.phase == Phase::Running).map(|_| ())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_answers_404_409_400_and_runs_the_simulators_commands() {
    let agent = start_agent(sbxlet::Faults::default()).await;
    let (server, client) = start_server(test_config(&[])).await;
    register(&client, "sim", agent.addr()).await;
    running_sandbox(&client, "sbx").await;

    let result = client.exec("sbx", &request(&["echo", "hello", "sim"])).await.unwrap();
    assert_eq!((result.exit_code, result.stdout.as_str()), (0, "hello sim\n"));
    let fed = client.exec("sbx", &ExecRequest { stdin: Some("fed".into()), ..request(&["cat"]) }).await.unwrap();
    assert_eq!(fed.stdout, "fed");
    assert_eq!(client.exec("sbx", &request(&["false"])).await.unwrap().exit_code, 1);

    assert_eq!(client.exec("ghost", &request(&["true"])).await.unwrap_err().status(), Some(404));
    let bad_container = ExecRequest { container: Some("nope".into()), ..request(&["true"]) };
    assert_eq!(client.exec("sbx", &bad_container).await.unwrap_err().status(), Some(404));
    assert_eq!(client.exec("sbx", &request(&[])).await.unwrap_err().status(), Some(400));
    let zero = ExecRequest { timeout_seconds: Some(0), ..request(&["true"]) };
    assert_eq!(client.exec("sbx", &zero).await.unwrap_err().status(), Some(400));

    // Pending (nothing fits): 409 for exec, files and logs alike.
    client.create_sandbox("big", &sandbox_spec("1000")).await.unwrap();
    assert_eq!(client.exec("big", &request(&["true"])).await.unwrap_err().status(), Some(409));
    let files = client.download("big", &[("path", "/etc/hostname")], false).await.err().unwrap();
    assert_eq!(files.status(), Some(409));
    assert_eq!(client.follow_logs("big", None, None).await.err().unwrap().status(), Some(409));

    // The simulator has no files: its 501 passes through, named.
    let files = client.download("sbx", &[("path", "/etc/hostname")], false).await.err().unwrap();
    assert_eq!(files.status(), Some(501), "{files}");

    // A streamed exec on the simulator: stdin in, the same bytes out, then the exit.
    let (mut input, mut outputs) = client.exec_stream("sbx", &request(&["cat"])).await.unwrap();
    input.stdin(b"ping").await.unwrap();
    assert_eq!(outputs.next().await.unwrap().unwrap(), ExecOutput::Stdout("ping".into()));
    input.close_stdin().await.unwrap();
    assert!(matches!(outputs.next().await.unwrap().unwrap(), ExecOutput::Exit { exit_code: 0, .. }));

    // A streamed exec of a sandbox that is not Running is refused before the upgrade.
    let refused = client.exec_stream("big", &request(&["true"])).await.err().unwrap();
    assert_eq!(refused.status(), Some(409), "{refused}");
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_is_gone_is_a_502_and_followed_logs_end_with_the_sandbox() {
    let agent = start_agent(sbxlet::Faults::default()).await;
    let (server, client) = start_server(test_config(&[])).await;
    register(&client, "sim", agent.addr()).await;
    running_sandbox(&client, "sbx").await;

    let mut lines = client.follow_logs("sbx", None, None).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), lines.next()).await.unwrap().unwrap().unwrap();
    assert!(!first.is_empty(), "the simulator's log lines come first");
    client.delete_sandbox("sbx").await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(chunk) = lines.next().await {
            chunk.unwrap();
        }
    })
    .await;
    assert!(ended.is_ok(), "a followed log ends once the sandbox is gone");

    running_sandbox(&client, "other").await;
    agent.shutdown().await;
    let unreachable = client.exec("other", &request(&["true"])).await.unwrap_err();
    assert_eq!(unreachable.status(), Some(502), "{unreachable}");
    assert!(unreachable.to_string().contains("node sim"), "names the node: {unreachable}");
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_exec_session_holds_its_long_running_slot_until_it_ends() {
    let agent = start_agent(sbxlet::Faults::default()).await;
    let (server, client) = start_server(test_config(&[("max_inflight_long_running", "1")])).await;
    register(&client, "sim", agent.addr()).await;
    running_sandbox(&client, "sbx").await;

    let (mut input, mut outputs) = client.exec_stream("sbx", &request(&["cat"])).await.unwrap();
    // The session is the one long-running slot: a second stream is refused while it lasts.
    let second = client.exec_stream("sbx", &request(&["cat"])).await.err().unwrap();
    assert_eq!(second.status(), Some(429), "{second}");
    input.close_stdin().await.unwrap();
    while let Some(Ok(output)) = outputs.next().await {
        if matches!(output, ExecOutput::Exit { .. }) {
            break;
        }
    }
    drop((input, outputs));
    eventually(10, "the slot back after the session", || async {
        let (input, outputs) = client.exec_stream("sbx", &request(&["true"])).await.ok()?;
        drop((input, outputs));
        Some(())
    })
    .await;
    server.stop().await.unwrap();
}
