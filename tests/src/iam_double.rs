//! A double of IAM and STS, for what `s3spot doctor` asks of them and moto does not answer as
//! AWS documents: `GetRole` (the spot service-linked role), `SimulatePrincipalPolicy` (evaluated
//! with [`crate::iam::Policy`] on the role's policy and the request's context entries, per action
//! and resource, as
//! <https://docs.aws.amazon.com/IAM/latest/APIReference/API_SimulatePrincipalPolicy.html> says),
//! and `AssumeRole`, refused unless a test allows it (a role trusted by a service alone, as the
//! launcher's is, cannot be assumed by a person).

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};

use crate::ec2::escape;
use crate::http::{ServerThread, param, query_params};
use crate::iam::{Authorization, Policy};

#[derive(Default)]
struct State {
    /// Role name -> its path.
    roles: HashMap<String, String>,
    /// Role ARN -> its permissions.
    policies: HashMap<String, Policy>,
    /// Role ARN -> the access key an allowed AssumeRole hands out.
    assumable: HashMap<String, String>,
    simulations: usize,
}

pub struct IamDouble {
    server: ServerThread,
    state: Arc<Mutex<State>>,
}

impl IamDouble {
    pub fn start() -> IamDouble {
        let state = Arc::new(Mutex::new(State::default()));
        let shared = Arc::clone(&state);
        let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
            let state = Arc::clone(&shared);
            async move {
                let params = query_params(request).await;
                let mut state = state.lock().expect("no panic holding the state");
                Ok::<_, Infallible>(answer(&mut state, &params))
            }
        });
        IamDouble {
            server: ServerThread::start("iam-double", service),
            state,
        }
    }

    /// For `AWS_ENDPOINT_URL_IAM` and `AWS_ENDPOINT_URL_STS`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.server.address)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("no panic holding the state")
    }

    pub fn add_role(&self, name: &str, path: &str) {
        self.state().roles.insert(name.to_owned(), path.to_owned());
    }

    /// What the role with `arn` may do, for `SimulatePrincipalPolicy`.
    pub fn set_role_policy(&self, arn: &str, policy: Policy) {
        self.state().policies.insert(arn.to_owned(), policy);
    }

    /// Lets the caller assume the role with `arn`; its session signs with `access_key`.
    pub fn allow_assume(&self, arn: &str, access_key: &str) {
        self.state()
            .assumable
            .insert(arn.to_owned(), access_key.to_owned());
    }

    pub fn simulations(&self) -> usize {
        self.state().simulations
    }
}

/// `Name.member.1`, `Name.member.2`, ...
fn members(params: &[(String, String)], name: &str) -> Vec<String> {
    (1..)
        .map_while(|i| param(params, &format!("{name}.member.{i}")).map(str::to_owned))
        .collect()
}

fn answer(state: &mut State, params: &[(String, String)]) -> Response<Full<Bytes>> {
    match param(params, "Action").unwrap_or_default() {
        "GetRole" => {
            let name = param(params, "RoleName").unwrap_or_default();
            match state.roles.get(name) {
                Some(path) => ok(
                    "GetRole",
                    &format!(
                        "<Role><Path>{path}</Path><RoleName>{name}</RoleName>\
                         <RoleId>AROAEXAMPLE</RoleId>\
                         <Arn>arn:aws:iam::123456789012:role{path}{name}</Arn>\
                         <CreateDate>2026-01-01T00:00:00Z</CreateDate></Role>",
                        path = escape(path),
                        name = escape(name)
                    ),
                ),
                None => error(
                    StatusCode::NOT_FOUND,
                    "NoSuchEntity",
                    &format!("The role with name {name} cannot be found."),
                ),
            }
        }
        "SimulatePrincipalPolicy" => simulate(state, params),
        "AssumeRole" => {
            let arn = param(params, "RoleArn").unwrap_or_default();
            match state.assumable.get(arn) {
                Some(key) => ok(
                    "AssumeRole",
                    &format!(
                        "<Credentials><AccessKeyId>{key}</AccessKeyId>\
                         <SecretAccessKey>{secret}</SecretAccessKey>\
                         <SessionToken>session-token</SessionToken>\
                         <Expiration>2099-01-01T00:00:00Z</Expiration></Credentials>\
                         <AssumedRoleUser><AssumedRoleId>AROAEXAMPLE:s3spot-doctor</AssumedRoleId>\
                         <Arn>{arn}</Arn></AssumedRoleUser>",
                        key = escape(key),
                        secret = crate::SECRET_KEY,
                        arn = escape(arn)
                    ),
                ),
                None => error(
                    StatusCode::FORBIDDEN,
                    "AccessDenied",
                    &format!(
                        "User is not authorized to perform: sts:AssumeRole on resource: {arn}"
                    ),
                ),
            }
        }
        other => error(
            StatusCode::BAD_REQUEST,
            "InvalidAction",
            &format!("the IAM double does not answer {other:?}"),
        ),
    }
}

fn simulate(state: &mut State, params: &[(String, String)]) -> Response<Full<Bytes>> {
    state.simulations += 1;
    let source = param(params, "PolicySourceArn").unwrap_or_default();
    let Some(policy) = state.policies.get(source) else {
        return error(
            StatusCode::NOT_FOUND,
            "NoSuchEntity",
            &format!("The principal {source} cannot be found."),
        );
    };
    let mut context = Vec::new();
    for i in 1.. {
        let prefix = format!("ContextEntries.member.{i}");
        let Some(name) = param(params, &format!("{prefix}.ContextKeyName")) else {
            break;
        };
        context.push((
            name.to_owned(),
            members(params, &format!("{prefix}.ContextKeyValues")),
        ));
    }
    let resources = members(params, "ResourceArns");
    let resources = if resources.is_empty() {
        vec!["*".to_owned()]
    } else {
        resources
    };
    let mut results = String::new();
    for action in members(params, "ActionNames") {
        for resource in &resources {
            let request = Authorization {
                action: action.clone(),
                resource: resource.clone(),
                context: context.clone(),
            };
            let decision = if policy.allows(&request) {
                "allowed"
            } else {
                "implicitDeny"
            };
            let _ = write!(
                results,
                "<member><EvalActionName>{}</EvalActionName><EvalResourceName>{}</EvalResourceName>\
                 <EvalDecision>{decision}</EvalDecision><MatchedStatements/>\
                 <MissingContextValues/></member>",
                escape(&action),
                escape(resource)
            );
        }
    }
    ok(
        "SimulatePrincipalPolicy",
        &format!(
            "<IsTruncated>false</IsTruncated><EvaluationResults>{results}</EvaluationResults>"
        ),
    )
}

fn ok(action: &str, result: &str) -> Response<Full<Bytes>> {
    let body = format!(
        "<{action}Response><{action}Result>{result}</{action}Result>\
         <ResponseMetadata><RequestId>iam-double</RequestId></ResponseMetadata></{action}Response>"
    );
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/xml")
        .body(Full::new(Bytes::from(body)))
        .expect("a valid response")
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    let body = format!(
        "<ErrorResponse><Error><Type>Sender</Type><Code>{code}</Code><Message>{}</Message>\
         </Error><RequestId>iam-double</RequestId></ErrorResponse>",
        escape(message)
    );
    Response::builder()
        .status(status)
        .header("content-type", "text/xml")
        .body(Full::new(Bytes::from(body)))
        .expect("a valid response")
}
