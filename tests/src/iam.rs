//! IAM's evaluation of one identity policy, for the doubles that must deny what a policy does not
//! allow (moto evaluates no IAM condition). It follows AWS's documented logic
//! (<https://docs.aws.amazon.com/IAM/latest/UserGuide/reference_policies_evaluation-logic.html>):
//! an explicit deny wins, then an allow, and anything else is denied. Actions match without
//! regard to case, resources with `*` and `?` wildcards, and condition keys without regard to
//! case. A condition operator this evaluator does not know fails the test loudly rather than
//! being read as "allowed".

use serde_json::Value;

/// One policy document.
#[derive(Debug, Clone)]
pub struct Policy {
    statements: Vec<Statement>,
}

#[derive(Debug, Clone)]
struct Statement {
    allow: bool,
    actions: Vec<String>,
    resources: Vec<String>,
    conditions: Vec<Condition>,
}

#[derive(Debug, Clone)]
struct Condition {
    operator: String,
    key: String,
    values: Vec<String>,
}

/// What a request is authorized against: its action, one resource, and the request context's
/// keys (each with one or more values).
#[derive(Debug, Clone, Default)]
pub struct Authorization {
    pub action: String,
    pub resource: String,
    pub context: Vec<(String, Vec<String>)>,
}

impl Authorization {
    pub fn new(action: &str, resource: &str) -> Authorization {
        Authorization {
            action: action.to_owned(),
            resource: resource.to_owned(),
            context: Vec::new(),
        }
    }

    pub fn with(mut self, key: &str, value: &str) -> Authorization {
        self.context.push((key.to_owned(), vec![value.to_owned()]));
        self
    }

    pub fn with_all(mut self, key: &str, values: Vec<String>) -> Authorization {
        self.context.push((key.to_owned(), values));
        self
    }

    fn values(&self, key: &str) -> Option<&[String]> {
        self.context
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(key))
            .map(|(_, values)| values.as_slice())
    }
}

fn strings(value: &Value) -> Vec<String> {
    match value {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items.iter().flat_map(strings).collect(),
        Value::Bool(b) => vec![b.to_string()],
        Value::Number(n) => vec![n.to_string()],
        other => panic!("not a policy value: {other}"),
    }
}

impl Policy {
    /// A policy document as IAM stores it, its intrinsics already resolved.
    pub fn from_document(document: &Value) -> Policy {
        let statements = match &document["Statement"] {
            Value::Array(items) => items.clone(),
            single => vec![single.clone()],
        };
        let statements = statements
            .iter()
            .map(|s| {
                assert!(
                    s.get("NotAction").is_none() && s.get("NotResource").is_none(),
                    "NotAction/NotResource are not evaluated here: {s}"
                );
                let mut conditions = Vec::new();
                if let Some(Value::Object(operators)) = s.get("Condition") {
                    for (operator, keys) in operators {
                        let Value::Object(keys) = keys else {
                            panic!("a condition operator takes an object: {s}")
                        };
                        for (key, values) in keys {
                            conditions.push(Condition {
                                operator: operator.clone(),
                                key: key.clone(),
                                values: strings(values),
                            });
                        }
                    }
                }
                Statement {
                    allow: match s["Effect"].as_str() {
                        Some("Allow") => true,
                        Some("Deny") => false,
                        other => panic!("an Effect of {other:?}: {s}"),
                    },
                    actions: strings(&s["Action"]),
                    resources: strings(&s["Resource"]),
                    conditions,
                }
            })
            .collect();
        Policy { statements }
    }

    /// Whether the policy allows the request.
    pub fn allows(&self, request: &Authorization) -> bool {
        let applies = |s: &&Statement| {
            s.actions.iter().any(|a| {
                glob(
                    &a.to_ascii_lowercase(),
                    &request.action.to_ascii_lowercase(),
                )
            }) && s.resources.iter().any(|r| glob(r, &request.resource))
                && s.conditions.iter().all(|c| c.holds(request))
        };
        let matching: Vec<&Statement> = self.statements.iter().filter(applies).collect();
        !matching.iter().any(|s| !s.allow) && matching.iter().any(|s| s.allow)
    }
}

impl Condition {
    fn holds(&self, request: &Authorization) -> bool {
        let (set, operator) = match self.operator.split_once(':') {
            Some((set, operator)) => (Some(set), operator),
            None => (None, self.operator.as_str()),
        };
        let (operator, if_exists) = match operator.strip_suffix("IfExists") {
            Some(operator) => (operator, true),
            None => (operator, false),
        };
        let present = request.values(&self.key);
        if operator == "Null" {
            let wants_absent = self.values.iter().any(|v| v == "true");
            return present.is_none() == wants_absent;
        }
        let Some(values) = present else {
            // A missing key fails every operator but the negated ones, the IfExists ones, and
            // ForAllValues, which holds for an empty set.
            return if_exists
                || set == Some("ForAllValues")
                || (set.is_none() && operator.contains("Not"));
        };
        let one = |value: &str| -> bool {
            let any = |matches: &dyn Fn(&str) -> bool| self.values.iter().any(|v| matches(v));
            match operator {
                "StringEquals" | "ArnEquals" => any(&|v| v == value),
                "StringNotEquals" | "ArnNotEquals" => !any(&|v| v == value),
                "StringEqualsIgnoreCase" => any(&|v| v.eq_ignore_ascii_case(value)),
                "StringLike" | "ArnLike" => any(&|v| glob(v, value)),
                "StringNotLike" | "ArnNotLike" => !any(&|v| glob(v, value)),
                "Bool" => any(&|v| v.eq_ignore_ascii_case(value)),
                "NumericLessThanEquals"
                | "NumericLessThan"
                | "NumericEquals"
                | "NumericGreaterThanEquals"
                | "NumericGreaterThan" => {
                    let (Ok(got), true) = (value.parse::<f64>(), true) else {
                        return false;
                    };
                    any(&|v| {
                        v.parse::<f64>().is_ok_and(|limit| match operator {
                            "NumericLessThanEquals" => got <= limit,
                            "NumericLessThan" => got < limit,
                            "NumericEquals" => got == limit,
                            "NumericGreaterThanEquals" => got >= limit,
                            _ => got > limit,
                        })
                    })
                }
                other => panic!("the condition operator {other} is not evaluated here"),
            }
        };
        match set {
            Some("ForAnyValue") => values.iter().any(|v| one(v)),
            Some("ForAllValues") => values.iter().all(|v| one(v)),
            Some(other) => panic!("the set operator {other} is not evaluated here"),
            // A single-valued key.
            None => values.iter().all(|v| one(v)),
        }
    }
}

/// IAM's wildcards: `*` any run of characters, `?` any one.
fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn wildcards() {
        assert!(glob(
            "arn:aws:s3:::data/analysis/*status.json",
            "arn:aws:s3:::data/analysis/a/b/status.json"
        ));
        assert!(!glob(
            "arn:aws:s3:::data/analysis/*status.json",
            "arn:aws:s3:::data/analysis/a/stdout.log"
        ));
        assert!(glob("a?c", "abc") && !glob("a?c", "ac"));
        assert!(glob("*", "") && glob("a*", "a"));
    }

    #[test]
    fn deny_wins_and_conditions_must_hold() {
        let policy = Policy::from_document(&json!({"Statement": [
            {"Effect": "Allow", "Action": "ec2:TerminateInstances", "Resource": "arn:i/*",
             "Condition": {"StringEquals": {"ec2:ResourceTag/s3spot:pipeline": "p"}}},
            {"Effect": "Allow", "Action": "s3:*", "Resource": "*"},
            {"Effect": "Deny", "Action": "s3:PutObject", "Resource": "arn:s3:::b/claims/*"},
        ]}));
        let terminate = Authorization::new("ec2:TerminateInstances", "arn:i/i-1");
        assert!(!policy.allows(&terminate), "no tag, no match");
        assert!(
            policy.allows(
                &terminate
                    .clone()
                    .with("ec2:ResourceTag/s3spot:pipeline", "p")
            )
        );
        assert!(!policy.allows(&terminate.with("EC2:ResourceTag/s3spot:pipeline", "q")));
        assert!(policy.allows(&Authorization::new("s3:PutObject", "arn:s3:::b/x")));
        assert!(!policy.allows(&Authorization::new("s3:PutObject", "arn:s3:::b/claims/1")));
        assert!(
            !policy.allows(&Authorization::new("ec2:RunInstances", "*")),
            "default deny"
        );
    }

    #[test]
    fn bool_and_arn_like() {
        let policy = Policy::from_document(&json!({"Statement": {
            "Effect": "Allow", "Action": "ec2:RunInstances", "Resource": "*",
            "Condition": {"ArnLike": {"ec2:LaunchTemplate": "arn:lt/lt-1"},
                          "Bool": {"ec2:IsLaunchTemplateResource": "true"}}}}));
        let run = Authorization::new("ec2:RunInstances", "arn:volume/*")
            .with("ec2:LaunchTemplate", "arn:lt/lt-1");
        assert!(policy.allows(&run.clone().with("ec2:IsLaunchTemplateResource", "true")));
        assert!(!policy.allows(&run.clone().with("ec2:IsLaunchTemplateResource", "false")));
        assert!(!policy.allows(&run), "a missing key fails the condition");
        let deny_others = Policy::from_document(&json!({"Statement": [
            {"Effect": "Allow", "Action": "s3:GetObject", "Resource": "*"},
            {"Effect": "Deny", "Action": "s3:GetObject", "Resource": "*",
             "Condition": {"StringNotEquals": {"aws:PrincipalAccount": "123456789012"}}}]}));
        let get = Authorization::new("s3:GetObject", "arn:aws:s3:::b/k");
        assert!(!policy.allows(&get.clone()), "nothing allows it");
        assert!(
            !deny_others.allows(&get),
            "a negated operator holds when its key is missing, so the deny applies"
        );
        assert!(deny_others.allows(&get.with("aws:PrincipalAccount", "123456789012")));
    }
}
