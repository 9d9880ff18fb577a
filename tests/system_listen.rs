//! `system_listen`: a second listener, on its own thread, that answers controllers, nodes,
//! `/metrics` and `/healthz`, and refuses users' work with a JSON 403 that points to the main one.

mod common;

use common::*;
use reqwest::Method;
use serde_json::json;

fn system_client(running: &sandboxd_o::server::Running, token: Option<&str>) -> sandboxd_client::Client {
    let addr = running.system_addr.expect("system_listen is on");
    sandboxd_client::Client::new(&format!("http://{addr}"), token.map(String::from)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_system_listener_answers_system_routes_and_refuses_user_work() {
    let (server, main) = start_server(test_config(&[("system_listen", "127.0.0.1:0")])).await;
    let system = system_client(&server, None);

    assert_eq!(call(&system, Method::GET, "/healthz", None).await.0, 200);
    let metrics = reqwest::get(format!("http://{}/metrics", server.system_addr.unwrap())).await.unwrap();
    assert_eq!(metrics.status(), 200);
    assert!(metrics.text().await.unwrap().contains("sandboxd_store_commits_total"), "the same process's metrics");

    let create = json!({ "id": "s1", "spec": sandbox_spec("100m") });
    let (status, body) = call(&system, Method::POST, "/api/v1/sandboxes", Some(create.clone())).await;
    assert_eq!(status, 403, "{body}");
    assert!(body["error"].as_str().unwrap().contains("system_listen"), "{body}");
    assert_eq!(call(&system, Method::GET, "/api/v1/sandboxes", None).await.0, 403);

    // The main listener serves everything as before.
    assert_eq!(call(&main, Method::POST, "/api/v1/sandboxes", Some(create)).await.0, 201);
    assert_eq!(call(&main, Method::GET, "/api/v1/sandboxes/s1", None).await.0, 200);
    // Leases are system work, whoever asks.
    let (status, body) = call(&system, Method::GET, "/api/v1/leases", None).await;
    assert_eq!(status, 200, "{body}");

    // Stopping joins the listener's thread too.
    tokio::time::timeout(std::time::Duration::from_secs(15), server.stop()).await.expect("stops").unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controllers_and_nodes_may_do_anything_there_and_users_nothing_but_system_routes() {
    let dir = tempfile::tempdir().unwrap();
    let admin_token = dir.path().join("admin.token");
    std::fs::write(&admin_token, "admin-secret-for-the-system-listener-test\n").unwrap();
    let config = test_config(&[("auth_token_file", admin_token.to_str().unwrap()), ("system_listen", "127.0.0.1:0")]);
    let (server, _) = start_server(config).await;
    let admin = system_client(&server, Some("admin-secret-for-the-system-listener-test"));
    let main_admin = sandboxd_client::Client::new(
        &format!("http://{}", server.addr),
        Some("admin-secret-for-the-system-listener-test".into()),
    )
    .unwrap();
    let token = |identity: &str, role: &str| {
        let main_admin = main_admin.clone();
        let body = json!({ "identity": identity, "role": role });
        async move {
            let (status, answer) = call(&main_admin, Method::POST, "/api/v1/tokens", Some(body)).await;
            assert_eq!(status, 201, "{answer}");
            answer["token"].as_str().unwrap().to_string()
        }
    };
    let controller = system_client(&server, Some(&token("ctrl", "controller").await));
    let user = system_client(&server, Some(&token("alice", "user").await));

    // A remote controller's informers list there, and its status writes go there.
    assert_eq!(call(&controller, Method::GET, "/api/v1/sandboxes", None).await.0, 200);
    assert_eq!(call(&controller, Method::GET, "/api/v1/nodes", None).await.0, 200);
    // The admin may scrape there, but its user work is refused like anyone's.
    let scrape = reqwest::Client::new()
        .get(format!("http://{}/metrics", server.system_addr.unwrap()))
        .bearer_auth("admin-secret-for-the-system-listener-test")
        .send()
        .await
        .unwrap();
    assert_eq!(scrape.status(), 200);
    assert_eq!(call(&admin, Method::GET, "/api/v1/sandboxes", None).await.0, 403);
    let (status, body) = call(&user, Method::GET, "/api/v1/sandboxes", None).await;
    assert_eq!(status, 403, "{body}");
    // Authentication still comes first: no token, no answer but /healthz.
    let anonymous = system_client(&server, None);
    assert_eq!(call(&anonymous, Method::GET, "/api/v1/leases", None).await.0, 401);
    assert_eq!(call(&anonymous, Method::GET, "/healthz", None).await.0, 200);
    server.stop().await.unwrap();
}
