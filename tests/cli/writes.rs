//! Many writes in flight at once on one connection: the leader proposes
//! the writes that arrive together as one batch, and each must still get
//! its own answer — its own object, its own revision, its own conflict.

use std::collections::{BTreeMap, BTreeSet};

use strait_proto::v1::resources_client::ResourcesClient;
use strait_proto::v1::{
    ApplyRequest, GetRequest, Object, ObjectMeta, Service, ServicePort, ServiceSpec, object,
};
use tonic::transport::Channel;

use crate::harness::*;

const VALUE: &str = "test.strait.dev/value";

fn service(name: &str, value: &str, resource_version: &str) -> Object {
    Object {
        kind: Some(object::Kind::Service(Service {
            api_version: "v1".into(),
            kind: "Service".into(),
            metadata: Some(ObjectMeta {
                name: name.into(),
                namespace: "default".into(),
                annotations: BTreeMap::from([(VALUE.into(), value.into())]),
                resource_version: resource_version.into(),
                ..Default::default()
            }),
            spec: Some(ServiceSpec {
                ports: vec![ServicePort {
                    port: 80,
                    protocol: "TCP".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        })),
    }
}

fn value_of(o: &Object) -> String {
    o.metadata()
        .and_then(|m| m.annotations.get(VALUE))
        .cloned()
        .unwrap_or_default()
}

async fn apply(
    mut client: ResourcesClient<Channel>,
    obj: Object,
) -> Result<(Object, u64), tonic::Status> {
    let resp = client
        .apply(ApplyRequest { object: Some(obj) })
        .await?
        .into_inner();
    Ok((resp.object.expect("an applied object"), resp.revision))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_each_get_their_own_answer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = Control::start(dir.path(), &[]);
    let client = ResourcesClient::connect(format!("http://{}", c.addr))
        .await
        .expect("connect");

    let (shared, _) = apply(client.clone(), service("shared", "start", ""))
        .await
        .expect("create shared");
    let rv = shared
        .metadata()
        .expect("metadata")
        .resource_version
        .clone();

    // Rounds of 64 creates and 8 updates of `shared`, all from one
    // revision, in flight together: all pass the leader's dry run, the
    // first to apply wins and the others must get their own conflict.
    const CREATES: usize = 64;
    const RACERS: usize = 8;
    let mut revisions = BTreeSet::new();
    let mut winners = Vec::new();
    let mut rv = rv;
    for round in 0..4 {
        let creates: Vec<_> = (0..CREATES)
            .map(|i| {
                let name = format!("r{round}-c{i}");
                let value = format!("v{round}-{i}");
                let client = client.clone();
                tokio::spawn(async move {
                    let got = apply(client, service(&name, &value, "")).await;
                    (name, value, got)
                })
            })
            .collect();
        let racers: Vec<_> = (0..RACERS)
            .map(|i| {
                let value = format!("race{round}-{i}");
                let client = client.clone();
                let rv = rv.clone();
                tokio::spawn(async move {
                    let got = apply(client, service("shared", &value, &rv)).await;
                    (value, got)
                })
            })
            .collect();

        for h in creates {
            let (name, value, got) = h.await.expect("task");
            let (obj, revision) = got.unwrap_or_else(|e| panic!("create {name}: {e}"));
            assert_eq!(obj.name(), name, "another write's object came back");
            assert_eq!(value_of(&obj), value, "{name} came back with another value");
            assert!(
                revisions.insert(revision),
                "revision {revision} answered twice"
            );
        }
        let mut won = Vec::new();
        for h in racers {
            let (value, got) = h.await.expect("task");
            match got {
                Ok((obj, revision)) => {
                    assert_eq!(value_of(&obj), value, "a racer got another's answer");
                    assert!(
                        revisions.insert(revision),
                        "revision {revision} answered twice"
                    );
                    rv = obj.metadata().expect("metadata").resource_version.clone();
                    won.push(value);
                }
                Err(e) => {
                    assert_eq!(e.code(), tonic::Code::Aborted, "{value}: {e}");
                    assert!(
                        e.message().contains("the object has been modified"),
                        "{value}: {e}"
                    );
                }
            }
        }
        assert_eq!(
            won.len(),
            1,
            "round {round}: exactly one racer wins: {won:?}"
        );
        winners.extend(won);
    }

    // What was acknowledged is what is stored.
    let stored = client
        .clone()
        .get(GetRequest {
            kind: "Service".into(),
            namespace: "default".into(),
            name: "shared".into(),
            ..Default::default()
        })
        .await
        .expect("get shared")
        .into_inner()
        .object
        .expect("object");
    assert_eq!(Some(&value_of(&stored)), winners.last());
    let listed = get_json(&c, &["svc"]);
    let items = listed["items"].as_array().expect("items");
    assert_eq!(items.len(), 4 * CREATES + 1);
}
