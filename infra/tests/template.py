"""infra/template.yaml as CloudFormation sees it: loaded with cfn-lint's YAML reader (which
understands the short intrinsic tags) and put through the SAM transform (aws-sam-translator),
as `sam deploy` would after `sam package`."""

import copy
import json
import os
from pathlib import Path

from cfnlint.decode import cfn_yaml
from samtranslator.translator.transform import transform

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "infra" / "template.yaml"


class _NoManagedPolicies:
    """The template names its managed policy by ARN; the transform must never look one up."""

    def load(self):
        return {}


def source():
    """The template as written, intrinsics as dicts ({"Ref": ...})."""
    return json.loads(json.dumps(cfn_yaml.load(str(TEMPLATE))))


def transformed(template=None):
    """The template after the SAM transform. `sam package` replaces CodeUri with an S3 location
    first; the transform refuses a local path."""
    template = copy.deepcopy(template if template is not None else source())
    for resource in template["Resources"].values():
        if resource["Type"] == "AWS::Serverless::Function":
            resource["Properties"]["CodeUri"] = "s3://packaged/launcher.zip"
    # The transform fills in AWS::Region itself and fails without one.
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    return transform(template, {}, _NoManagedPolicies())


def resources_of_type(template, kind):
    return {name: r for name, r in template["Resources"].items() if r["Type"] == kind}


def as_list(value):
    return value if isinstance(value, list) else [value]


def policy_documents(template):
    """(where, document) for every IAM, bucket, queue and topic policy in the template."""
    for name, resource in template["Resources"].items():
        props = resource.get("Properties", {})
        kind = resource["Type"]
        if kind == "AWS::IAM::Role":
            yield f"{name} trust policy", props["AssumeRolePolicyDocument"]
            for policy in props.get("Policies", []):
                yield f"{name}/{policy['PolicyName']}", policy["PolicyDocument"]
        elif kind in ("AWS::IAM::Policy", "AWS::IAM::ManagedPolicy"):
            yield name, props["PolicyDocument"]
        elif kind in ("AWS::S3::BucketPolicy", "AWS::SQS::QueuePolicy", "AWS::SNS::TopicPolicy"):
            yield name, props["PolicyDocument"]


def key_policies(template):
    """(where, document) for every KMS key policy. Apart from policy_documents: in a key policy,
    Resource "*" is the key itself, and its administrators' actions are wildcards by design."""
    for name, resource in template["Resources"].items():
        if resource["Type"] == "AWS::KMS::Key":
            yield f"{name} key policy", resource["Properties"]["KeyPolicy"]


def statements(document):
    return as_list(document["Statement"])


def role_statements(template, role):
    props = template["Resources"][role]["Properties"]
    return [s for policy in props.get("Policies", []) for s in statements(policy["PolicyDocument"])]


def sub_text(value):
    """The text of a plain string or of an Fn::Sub, so that ARNs can be compared as written."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and "Fn::Sub" in value:
        sub = value["Fn::Sub"]
        return sub if isinstance(sub, str) else sub[0]
    return json.dumps(value, sort_keys=True)
