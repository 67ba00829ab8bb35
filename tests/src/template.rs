//! `infra/template.yaml` resolved as a deployed stack would have it, by `infra/tests/resolve.py`
//! (in the project's `.venv`): the launcher function's environment and any of its policies.

use std::collections::HashMap;
use std::process::Command;

use crate::{show, workspace_root};

pub struct Resolved {
    pub environment: HashMap<String, String>,
    /// Policy documents by the name asked for: `Role/PolicyName`, or a managed policy's id.
    pub policies: HashMap<String, serde_json::Value>,
}

/// The template with `params` on top of its defaults, `physical` ids (`Resource` or
/// `Resource.Attribute` = value) for what a deploy creates, and the named `policies`.
pub fn resolve(params: &[(&str, &str)], physical: &[(&str, &str)], policies: &[&str]) -> Resolved {
    let python = workspace_root().join(".venv/bin/python");
    assert!(
        python.is_file(),
        "{} not found. Run the test command from the README (scripts/test), which creates .venv \
         with cfn-lint and aws-sam-translator.",
        python.display()
    );
    let mut command = Command::new(&python);
    command
        .current_dir(workspace_root())
        .args(["-m", "infra.tests.resolve"]);
    for (name, value) in params {
        command.args(["--param", &format!("{name}={value}")]);
    }
    for (name, value) in physical {
        command.args(["--physical", &format!("{name}={value}")]);
    }
    for name in policies {
        command.args(["--policy", name]);
    }
    let output = command.output().expect("run infra.tests.resolve");
    assert!(output.status.success(), "{}", show(&output));
    let resolved: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("resolve prints JSON");
    Resolved {
        environment: serde_json::from_value(resolved["environment"].clone())
            .expect("a map of strings"),
        policies: serde_json::from_value(resolved["policies"].clone()).expect("a map"),
    }
}
