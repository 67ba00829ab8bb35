"""The IAM and hardening properties of infra/template.yaml, asserted on the template that
CloudFormation deploys (after the SAM transform).

Each property is a `check_*` function. The tests run every check on the real template, and the
mutation tests at the end run some of them on a weakened copy and expect them to fail, so that
no check passes by accident."""

import copy
import fnmatch
import json
import re
import unittest

from infra.tests.template import (
    ROOT,
    as_list,
    key_policies,
    policy_documents,
    resources_of_type,
    role_statements,
    source,
    statements,
    sub_text,
    transformed,
)

LAUNCH_TEMPLATE_ARN = (
    "arn:${AWS::Partition}:ec2:${AWS::Region}:${AWS::AccountId}:launch-template/${WorkerLaunchTemplate}"
)
# Resources a RunInstances call touches besides the instance, each of which must come from the
# launch template.
# Session Manager's channels, which support no resource-level permissions.
SESSION_CHANNELS = [
    "ssmmessages:CreateControlChannel",
    "ssmmessages:CreateDataChannel",
    "ssmmessages:OpenControlChannel",
    "ssmmessages:OpenDataChannel",
]
# Batch's job listing and description, which support no resource-level permissions.
BATCH_READS = ["batch:ListJobs", "batch:DescribeJobs"]
TEMPLATE_RESOURCE_TYPES = {"volume", "network-interface", "subnet", "security-group", "image", "key-pair"}

# Job state-change events: what the launcher, the worker and the operators may put on the
# account's default bus, and what the notification rule takes from it.
EVENT_SOURCE = "s3spot"
EVENT_DETAIL_TYPE = "s3spot Job State Change"
DEFAULT_BUS = "arn:${AWS::Partition}:events:${AWS::Region}:${AWS::AccountId}:event-bus/default"
PUT_JOB_EVENTS = {
    "Sid": "PutJobEventsOnTheDefaultBus",
    "Effect": "Allow",
    "Action": "events:PutEvents",
    "Resource": {"Fn::Sub": DEFAULT_BUS},
    "Condition": {
        # The reference types both keys ArrayOfString: every value given must be these...
        "ForAllValues:StringEquals": {
            "events:source": EVENT_SOURCE,
            "events:detail-type": EVENT_DETAIL_TYPE,
        },
        # ...and ForAllValues holds for a key that is absent, so they must be given.
        "Null": {"events:source": "false", "events:detail-type": "false"},
    },
}
EVENTS_RS = ROOT / "bootstrap" / "src" / "events.rs"
# KMS operations that encrypt or decrypt: the key's administrators get none of them.
KMS_CRYPTO = [
    "kms:Decrypt",
    "kms:Encrypt",
    "kms:GenerateDataKey",
    "kms:GenerateDataKeyWithoutPlaintext",
    "kms:GenerateDataKeyPair",
    "kms:GenerateDataKeyPairWithoutPlaintext",
    "kms:ReEncryptFrom",
    "kms:ReEncryptTo",
]
# The resources that exist only when NotifyEmail is set.
NOTIFICATION_RESOURCES = {
    "NotifyKey": "AWS::KMS::Key",
    "NotifyTopic": "AWS::SNS::Topic",
    "NotifySubscription": "AWS::SNS::Subscription",
    "NotifyTopicPolicy": "AWS::SNS::TopicPolicy",
    "NotifyRule": "AWS::Events::Rule",
}


def rust_struct_fields(source, name):
    """The field names of `pub struct <name>` in Rust source."""
    body = re.search(rf"pub struct {name} \{{(.*?)\n\}}", source, re.S)
    assert body, f"no struct {name}"
    return re.findall(r"^\s*pub (\w+):", body.group(1), re.M)


def job_states():
    """The states a job's events name, as bootstrap/src/events.rs spells them."""
    source = EVENTS_RS.read_text()
    body = re.search(r"pub fn as_str\(self\) -> &'static str \{(.*?)\n    \}", source, re.S)
    assert body, "cannot read JobState::as_str from bootstrap/src/events.rs"
    states = re.findall(r'JobState::\w+ => "([a-z_]+)"', body.group(1))
    assert states, "cannot read the job states from bootstrap/src/events.rs"
    return states


def refers_to(value, names):
    """Whether a template value refers (Ref, GetAtt, Sub) to any of the logical ids `names`."""
    text = json.dumps(value)
    return any(
        re.search(rf'"Ref": "{n}"|"Fn::GetAtt": \["{n}"|\$\{{{n}[}}.]', text) for n in names
    )


def run_instances_statements(template):
    return [
        s
        for s in role_statements(template, "LauncherRole")
        if "ec2:RunInstances" in as_list(s["Action"])
    ]


def resource_type(arn_text):
    """'...:volume/*' -> 'volume'; '...::image/*' -> 'image'."""
    return arn_text.rsplit(":", 1)[-1].split("/", 1)[0]


# --------------------------------------------------------------------------------------- checks


def check_no_wildcard_actions(template):
    for where, document in policy_documents(template):
        for s in statements(document):
            for action in as_list(s["Action"]):
                assert action != "*", f"{where}: a bare '*' action"
                # A deny may name a whole service (the TLS-only bucket policies deny s3:*);
                # an allow never grants a wildcard.
                if s["Effect"] == "Allow":
                    assert "*" not in action, f"{where}: allows the wildcard action {action}"


def check_resource_star_only_where_required(template):
    for where, document in policy_documents(template):
        for s in statements(document):
            if s["Effect"] != "Allow" or "Resource" not in s:
                continue
            if "*" in as_list(s["Resource"]):
                assert as_list(s["Action"]) in (
                    ["ec2:DescribeInstances"],
                    ["ec2:DescribeSpotPriceHistory"],
                    SESSION_CHANNELS,
                    BATCH_READS,
                ), (
                    f"{where}: Resource '*' for {s['Action']}; only DescribeInstances, "
                    "DescribeSpotPriceHistory, the Session Manager channels and Batch's "
                    "ListJobs and DescribeJobs need it"
                )
                assert "RequiresWildcard" in s.get("Sid", ""), (
                    f"{where}: the Resource '*' statement must say why in its Sid"
                )


def check_pass_role_scoped(template):
    passes = [
        s
        for _, document in policy_documents(template)
        for s in statements(document)
        if "iam:PassRole" in as_list(s["Action"])
    ]
    # The launcher's, and the operators' copy of it (for `s3spot jobs retry`).
    assert len(passes) == 2, f"expected two iam:PassRole statements, found {len(passes)}"
    for s in passes:
        assert as_list(s["Action"]) == ["iam:PassRole"]
        assert s["Resource"] == {"Fn::GetAtt": ["InstanceRole", "Arn"]}, s["Resource"]
        assert s.get("Condition") == {
            "StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}
        }, "iam:PassRole must be limited to EC2"


def check_operator_policy(template):
    """The operators' managed policy is the launcher's permissions, but for its queue and logs,
    and the jobs' logs to read: nothing more, and nothing the commands need less."""
    launcher = [
        s
        for s in role_statements(template, "LauncherRole")
        if not any(a.startswith(("sqs:", "logs:")) for a in as_list(s["Action"]))
    ]
    policy = template["Resources"]["OperatorPolicy"]
    assert policy["Type"] == "AWS::IAM::ManagedPolicy"
    operator = statements(policy["Properties"]["PolicyDocument"])
    extra = [s for s in operator if s not in launcher]
    assert [s not in operator for s in launcher] == [False] * len(launcher), (
        "the operator policy lacks a launcher statement that the job commands use"
    )
    assert extra == [
        {
            "Sid": "ReadJobLogs",
            "Effect": "Allow",
            "Action": "s3:GetObject",
            "Resource": [
                {"Fn::Sub": "${DataBucket.Arn}/analysis/*/stdout.log"},
                {"Fn::Sub": "${DataBucket.Arn}/analysis/*/stderr.log"},
            ],
        }
    ], extra
    assert "Roles" not in policy["Properties"] and "Users" not in policy["Properties"], (
        "people attach it themselves"
    )
    assert template["Outputs"]["OperatorPolicyArn"]["Value"] == {"Ref": "OperatorPolicy"}


# What IAM authorizes CreateFleet on, besides the fleet (the service authorization reference).
CREATE_FLEET_RESOURCE_TYPES = {"instance", "volume", "subnet", "image"}


def check_run_instances_conditioned(template):
    covered = set()
    fleet_covered = set()
    for s in run_instances_statements(template):
        actions = as_list(s["Action"])
        assert actions in (["ec2:RunInstances"], ["ec2:RunInstances", "ec2:CreateFleet"]), actions
        if "ec2:CreateFleet" in actions:
            fleet_covered |= {
                resource_type(sub_text(r))
                for r in as_list(s["Resource"])
                if sub_text(r) != LAUNCH_TEMPLATE_ARN
            }
        condition = s.get("Condition", {})
        for resource in as_list(s["Resource"]):
            arn = sub_text(resource)
            kind = resource_type(arn)
            if arn == LAUNCH_TEMPLATE_ARN:
                continue
            if kind == "spot-instances-request":
                # Created with, and only with, a conditioned spot instance.
                continue
            assert condition.get("ArnLike", {}).get("ec2:LaunchTemplate") == {
                "Fn::Sub": LAUNCH_TEMPLATE_ARN
            }, f"RunInstances on {arn} is not tied to the launch template"
            if kind == "instance":
                assert condition.get("StringLike", {}).get("ec2:InstanceType") == {
                    "Fn::If": ["ChoosesByAttributes", ["*"], {"Ref": "InstanceTypes"}]
                }, "instances may only be of the configured types"
                assert condition["StringEquals"].get("ec2:MetadataHttpTokens") == "required"
            elif kind == "volume":
                assert condition.get("NumericLessThanEquals", {}).get("ec2:VolumeSize") == {
                    "Ref": "MaxDiskGiB"
                }, "volumes are bounded by MaxDiskGiB"
            elif kind in ("subnet", "network-interface"):
                assert condition.get("ArnEquals", {}).get("ec2:Vpc") == {
                    "Fn::Sub": "arn:${AWS::Partition}:ec2:${AWS::Region}:${AWS::AccountId}:vpc/${VpcId}"
                }, f"RunInstances on {arn} may leave the pipeline's VPC"
            else:
                assert condition.get("Bool", {}).get("ec2:IsLaunchTemplateResource") == "true", (
                    f"RunInstances on {arn} may override the launch template"
                )
            covered.add(kind)
    missing = (TEMPLATE_RESOURCE_TYPES | {"instance"}) - covered
    assert not missing, f"RunInstances statements do not cover {sorted(missing)}"
    missing = CREATE_FLEET_RESOURCE_TYPES - fleet_covered
    assert not missing, f"CreateFleet is not allowed, conditioned, on {sorted(missing)}"


def check_create_tags_only_at_launch(template):
    for s in role_statements(template, "LauncherRole"):
        if "ec2:CreateTags" in as_list(s["Action"]):
            assert s["Condition"] == {
                "StringEquals": {"ec2:CreateAction": ["RunInstances", "CreateFleet"]}
            }


def check_launcher_role_exact(template):
    actions = {
        a for s in role_statements(template, "LauncherRole") for a in as_list(s["Action"])
    }
    assert actions == {
        "ec2:CreateFleet",
        "ec2:RunInstances",
        "ec2:CreateTags",
        "ec2:DescribeInstances",
        "ec2:DescribeInstanceAttribute",
        "ec2:GetConsoleOutput",
        "ec2:DescribeSpotPriceHistory",
        "ec2:TerminateInstances",
        "s3:GetObject",
        "s3:PutObject",
        "s3:ListBucket",
        "s3:DeleteObject",
        "iam:PassRole",
        "sqs:ReceiveMessage",
        "sqs:DeleteMessage",
        "sqs:GetQueueAttributes",
        "logs:CreateLogStream",
        "logs:PutLogEvents",
        "events:PutEvents",
    }, sorted(actions)
    props = template["Resources"]["LauncherRole"]["Properties"]
    assert not props.get("ManagedPolicyArns"), "the launcher role takes no managed policy"
    for s in role_statements(template, "LauncherRole"):
        if any(a.startswith("sqs:") for a in as_list(s["Action"])):
            assert s["Resource"] == {"Fn::GetAtt": ["IntakeQueue", "Arn"]}, s["Resource"]
        if any(a.startswith("logs:") for a in as_list(s["Action"])):
            assert s["Resource"] == {"Fn::GetAtt": ["LauncherLogGroup", "Arn"]}, s["Resource"]
        if any(a in ("s3:GetObject", "s3:PutObject") for a in as_list(s["Action"])):
            assert sorted(sub_text(r) for r in as_list(s["Resource"])) == [
                "${DataBucket.Arn}/analysis/*/.s3spot/attempt-*.json",
                "${DataBucket.Arn}/analysis/*/status.json",
            ], "the launcher reads and writes status.json files and attempts' claims only"
        if "s3:ListBucket" in as_list(s["Action"]):
            assert s["Resource"] == {"Fn::GetAtt": ["DataBucket", "Arn"]}, s["Resource"]
        if "s3:DeleteObject" in as_list(s["Action"]):
            assert sub_text(s["Resource"]) == "${DataBucket.Arn}/analysis/.s3spot/waiting/*", (
                "the launcher deletes only its entries in the list of waiting jobs"
            )
        if as_list(s["Action"]) == ["ec2:CreateFleet"]:
            assert resource_type(sub_text(s["Resource"])) == "fleet", s["Resource"]
        if any(a.startswith("events:") for a in as_list(s["Action"])):
            assert s == PUT_JOB_EVENTS, s
        if {"ec2:DescribeInstanceAttribute", "ec2:GetConsoleOutput", "ec2:TerminateInstances"} & set(
            as_list(s["Action"])
        ):
            assert resource_type(sub_text(s["Resource"])) == "instance"
            assert s.get("Condition") == {
                "StringEquals": {"ec2:ResourceTag/s3spot:pipeline": {"Ref": "PipelineName"}}
            }, f"{s['Action']}: the pipeline's own instances only"


def check_reaper_scheduled(template):
    """The reaper runs on a schedule, as the launcher function, with the standard scheduled
    event (what `Record::Reap` recognises)."""
    rules = [
        r["Properties"]
        for r in resources_of_type(template, "AWS::Events::Rule").values()
        if "ScheduleExpression" in r["Properties"]
    ]
    assert len(rules) == 1, rules
    rule = rules[0]
    assert rule["ScheduleExpression"] == {"Ref": "ReaperRate"}
    assert rule.get("State", "ENABLED") == "ENABLED"
    targets = rule["Targets"]
    assert len(targets) == 1 and targets[0]["Arn"] == {"Fn::GetAtt": ["LauncherFunction", "Arn"]}
    assert "Input" not in targets[0], "the scheduled event itself, not a custom input"
    pattern = re.compile(template["Parameters"]["ReaperRate"]["AllowedPattern"])
    for good in ("rate(15 minutes)", "rate(1 minute)", "rate(5 minutes)", "rate(10 minutes)"):
        assert pattern.fullmatch(good), good
    # EC2 forgets an ended instance about an hour after it ends: a slower reaper could miss it.
    for bad in (
        "rate(16 minutes)",
        "rate(30 minutes)",
        "rate(1 hour)",
        "rate(1 minutes)",
        "rate(0 minutes)",
        "cron(0 * * * ? *)",
        "15",
    ):
        assert not pattern.fullmatch(bad), bad
    permissions = [
        p["Properties"]
        for p in resources_of_type(template, "AWS::Lambda::Permission").values()
        if p["Properties"]["Principal"] == "events.amazonaws.com"
    ]
    assert any(p["FunctionName"] == {"Ref": "LauncherFunction"} for p in permissions), permissions


def check_instance_role_exact(template):
    grants = {"Allow": {}, "Deny": {}}
    for s in role_statements(template, "InstanceRole"):
        for action in as_list(s["Action"]):
            for resource in as_list(s["Resource"]):
                grants[s["Effect"]].setdefault(action, set()).add(sub_text(resource))
    assert grants["Allow"] == {
        "s3:GetObject": {"${DataBucket.Arn}/*", "${ArtifactsBucket.Arn}/${WorkerKey}"},
        "s3:GetObjectVersion": {"${DataBucket.Arn}/*"},
        "s3:PutObject": {"${DataBucket.Arn}/analysis/*"},
        "s3:AbortMultipartUpload": {"${DataBucket.Arn}/analysis/*"},
        # Its job's state changes, as s3spot's own events (check_job_events).
        "events:PutEvents": {DEFAULT_BUS},
        # Session Manager and nothing else of SSM: no parameters, no documents.
        "ssm:UpdateInstanceInformation": {
            "arn:${AWS::Partition}:ec2:${AWS::Region}:${AWS::AccountId}:instance/*"
        },
        **{channel: {"*"} for channel in SESSION_CHANNELS},
    }, grants
    # A job's command runs with this role: it must not forge the launcher's claims.
    assert grants["Deny"] == {
        "s3:PutObject": {"${DataBucket.Arn}/analysis/*/.s3spot/attempt-*.json"},
    }, grants
    props = template["Resources"]["InstanceRole"]["Properties"]
    # AmazonSSMManagedInstanceCore, say, grants ssm:GetParameter(s) on every parameter.
    assert not props.get("ManagedPolicyArns"), "no managed policy: the role says all it grants"
    assert not any(
        r["Type"] in ("AWS::IAM::Policy", "AWS::IAM::ManagedPolicy")
        and {"Ref": "InstanceRole"} in r["Properties"].get("Roles", [])
        for r in template["Resources"].values()
    ), "no policy attached to the instance role from outside it" 
    trust = statements(props["AssumeRolePolicyDocument"])
    assert [s["Principal"] for s in trust] == [{"Service": "ec2.amazonaws.com"}]


def check_launch_template(template):
    data = template["Resources"]["WorkerLaunchTemplate"]["Properties"]["LaunchTemplateData"]
    assert data["MetadataOptions"]["HttpTokens"] == "required", "IMDSv2 must be required"
    assert data["MetadataOptions"].get("HttpEndpoint", "enabled") == "enabled"
    assert data["InstanceInitiatedShutdownBehavior"] == "terminate"
    assert data["IamInstanceProfile"] == {"Arn": {"Fn::GetAtt": ["InstanceProfile", "Arn"]}}
    (root,) = data["BlockDeviceMappings"]
    assert root["Ebs"]["VolumeType"] == "gp3"
    assert root["Ebs"]["Encrypted"] is True
    assert root["Ebs"]["DeleteOnTermination"] is True
    assert "AssociatePublicIpAddress" not in str(data), "no public IP is forced on"
    assert data["ImageId"] == {"Ref": "ImageId"}
    # The template names the security group; the fleet request names the subnets, which the
    # launch policy keeps in the pipeline's VPC.
    assert data.get("SecurityGroupIds") == [{"Fn::GetAtt": ["WorkerSecurityGroup", "GroupId"]}]
    assert "NetworkInterfaces" not in data and "SubnetId" not in data
    env = template["Resources"]["LauncherFunction"]["Properties"]["Environment"]["Variables"]
    assert env["S3SPOT_SUBNETS"] == {
        "Fn::If": ["HasSubnetIds", {"Fn::Join": [",", {"Ref": "SubnetIds"}]}, {"Ref": "SubnetId"}]
    }
    assert data["InstanceType"] == {"Fn::Select": [0, {"Ref": "InstanceTypes"}]}
    tagged = {spec["ResourceType"] for spec in data["TagSpecifications"]}
    assert tagged == {"instance", "volume"}


def check_no_ingress_by_default(template):
    group = template["Resources"]["WorkerSecurityGroup"]["Properties"]
    ingress = group.get("SecurityGroupIngress")
    assert ingress is not None and "Fn::If" in ingress, "ingress must be conditional"
    condition, when_set, otherwise = ingress["Fn::If"]
    assert condition == "HasSsh"
    assert otherwise == {"Ref": "AWS::NoValue"}
    assert [(r["FromPort"], r["ToPort"], r["CidrIp"]) for r in when_set] == [
        (22, 22, {"Ref": "SshCidr"})
    ]
    assert template["Conditions"]["HasSsh"] == {"Fn::Not": [{"Fn::Equals": [{"Ref": "SshCidr"}, ""]}]}
    assert template["Parameters"]["SshCidr"]["Default"] == ""
    egress = group["SecurityGroupEgress"]
    assert [(r["IpProtocol"], r["FromPort"], r["ToPort"]) for r in egress] == [("tcp", 443, 443)]


def check_buckets_hardened(template):
    buckets = resources_of_type(template, "AWS::S3::Bucket")
    assert set(buckets) == {"DataBucket", "ArtifactsBucket"}
    policies = {
        p["Properties"]["Bucket"]["Ref"]: p["Properties"]["PolicyDocument"]
        for p in resources_of_type(template, "AWS::S3::BucketPolicy").values()
    }
    for name, bucket in buckets.items():
        props = bucket["Properties"]
        assert props["PublicAccessBlockConfiguration"] == {
            "BlockPublicAcls": True,
            "BlockPublicPolicy": True,
            "IgnorePublicAcls": True,
            "RestrictPublicBuckets": True,
        }, f"{name}: Block Public Access"
        (sse,) = props["BucketEncryption"]["ServerSideEncryptionConfiguration"]
        assert sse["ServerSideEncryptionByDefault"]["SSEAlgorithm"] in ("AES256", "aws:kms")
        assert props.get("VersioningConfiguration") == {"Status": "Enabled"}, f"{name}: versioning"
        rules = props["LifecycleConfiguration"]["Rules"]
        assert any("NoncurrentVersionExpiration" in r and r["Status"] == "Enabled" for r in rules)
        assert props["OwnershipControls"]["Rules"] == [{"ObjectOwnership": "BucketOwnerEnforced"}]
        document = policies.get(name)
        assert document is not None, f"{name} has no bucket policy"
        denies = [
            s
            for s in statements(document)
            if s["Effect"] == "Deny"
            and s.get("Condition") == {"Bool": {"aws:SecureTransport": "false"}}
        ]
        assert len(denies) == 1, f"{name}: no TLS-only deny"
        (deny,) = denies
        assert deny["Principal"] == "*" and as_list(deny["Action"]) == ["s3:*"]
        assert {sub_text(r) for r in deny["Resource"]} == {
            json.dumps({"Fn::GetAtt": [name, "Arn"]}, sort_keys=True),
            f"${{{name}.Arn}}/*",
        }


def check_intake(template):
    resources = template["Resources"]
    queue = resources["IntakeQueue"]["Properties"]
    redrive = queue.get("RedrivePolicy", {})
    assert redrive.get("deadLetterTargetArn") == {"Fn::GetAtt": ["DeadLetterQueue", "Arn"]}
    assert redrive.get("maxReceiveCount") == {"Ref": "MaxReceiveCount"}
    function_timeout = resources["LauncherFunction"]["Properties"]["Timeout"]
    assert queue["VisibilityTimeout"] >= 6 * function_timeout, "visibility < 6 x function timeout"
    for name in ("IntakeQueue", "DeadLetterQueue"):
        assert resources[name]["Properties"].get("SqsManagedSseEnabled") is True, name
    (mapping,) = resources_of_type(template, "AWS::Lambda::EventSourceMapping").values()
    props = mapping["Properties"]
    assert props["EventSourceArn"] == {"Fn::GetAtt": ["IntakeQueue", "Arn"]}
    assert props.get("FunctionResponseTypes") == ["ReportBatchItemFailures"]
    assert props["ScalingConfig"]["MaximumConcurrency"] == {"Ref": "QueueConcurrency"}
    # S3 sends every object event to EventBridge, and the uploads rule filters out results.
    notifications = resources["DataBucket"]["Properties"]["NotificationConfiguration"]
    assert notifications == {"EventBridgeConfiguration": {"EventBridgeEnabled": True}}, notifications
    assert set(as_list(resources["DataBucket"]["DependsOn"])) >= {"UploadsRule", "IntakeQueuePolicy"}, (
        "the bucket sends no event before the rule and the queue policy exist"
    )
    # The rule names the bucket by the same name the bucket is given; if the two drifted apart,
    # no upload would ever reach the queue.
    bucket_name = sub_text(resources["DataBucket"]["Properties"]["BucketName"])
    prefix = resources["LauncherFunction"]["Properties"]["Environment"]["Variables"][
        "S3SPOT_RESULTS_PREFIX"
    ]
    uploads = resources["UploadsRule"]["Properties"]
    (name,) = uploads["EventPattern"]["detail"]["bucket"]["name"]
    assert sub_text(name) == bucket_name, (name, bucket_name)
    assert uploads["EventPattern"] == {
        "source": ["aws.s3"],
        "detail-type": ["Object Created"],
        "detail": {
            "bucket": {"name": [name]},
            "object": {"key": [{"anything-but": {"prefix": prefix}}]},
        },
    }, uploads["EventPattern"]
    assert uploads["State"] == "ENABLED"
    rule = resources["SpotInterruptionRule"]["Properties"]
    assert rule["EventPattern"] == {
        "source": ["aws.ec2"],
        "detail-type": ["EC2 Spot Instance Interruption Warning"],
    }, rule["EventPattern"]
    assert rule["State"] == "ENABLED"
    # Each rule delivers to the intake queue, retries for a day, and keeps what it could not
    # deliver in the dead-letter queue.
    for props in (uploads, rule):
        (target,) = props["Targets"]
        assert target["Arn"] == {"Fn::GetAtt": ["IntakeQueue", "Arn"]}
        assert target.get("DeadLetterConfig") == {"Arn": {"Fn::GetAtt": ["DeadLetterQueue", "Arn"]}}
        assert target.get("RetryPolicy", {}).get("MaximumEventAgeInSeconds", 0) >= 3600
    senders = {
        "ArnEquals": {
            "aws:SourceArn": [
                {"Fn::GetAtt": ["UploadsRule", "Arn"]},
                {"Fn::GetAtt": ["SpotInterruptionRule", "Arn"]},
            ]
        }
    }
    for policy, queue_name in (("IntakeQueuePolicy", "IntakeQueue"), ("DeadLetterQueuePolicy", "DeadLetterQueue")):
        document = resources[policy]["Properties"]["PolicyDocument"]
        (allow,) = [s for s in statements(document) if s["Effect"] == "Allow"]
        assert allow["Principal"] == {"Service": "events.amazonaws.com"}, policy
        assert as_list(allow["Action"]) == ["sqs:SendMessage"], policy
        assert allow["Resource"] == {"Fn::GetAtt": [queue_name, "Arn"]}, policy
        assert allow.get("Condition") == senders, f"{policy}: only the stack's two rules may send"
    handled = (ROOT / "lambda" / "src" / "event.rs").read_text()
    assert '"EC2 Spot Instance Interruption Warning"' in handled, "the launcher must read them"
    assert '"Object Created"' in handled, "the launcher must read S3's EventBridge events"


def check_function(template):
    resources = template["Resources"]
    function = resources["LauncherFunction"]
    props = function["Properties"]
    assert props["Runtime"] == "provided.al2023"
    assert function["Metadata"]["BuildMethod"] == "rust-cargolambda"
    assert function["Metadata"]["BuildProperties"]["Binary"] == "s3spot-lambda"
    assert props["Architectures"] == [{"Ref": "Architecture"}]
    assert props["LoggingConfig"]["LogFormat"] == "JSON"
    assert props["LoggingConfig"]["LogGroup"] == {"Ref": "LauncherLogGroup"}
    assert props.get("ReservedConcurrentExecutions") == {"Ref": "ReservedConcurrency"}
    assert props["Role"] == {"Fn::GetAtt": ["LauncherRole", "Arn"]}
    log_group = resources["LauncherLogGroup"]["Properties"]
    assert log_group["RetentionInDays"] == {"Ref": "LogRetentionDays"}


def check_environment_matches_launcher(template):
    """Every S3SPOT_* variable the template sets is one the launcher reads, and the required
    ones are all set, so that a rename on either side fails here instead of at start-up."""
    config = (ROOT / "lambda" / "src" / "config.rs").read_text()
    block = re.search(r"pub const VARIABLES: &\[&str\] = &\[(.*?)\];", config, re.S).group(1)
    known = set(re.findall(r'"(S3SPOT_[A-Z0-9_]+)"', block))
    assert known, "cannot read VARIABLES from lambda/src/config.rs"
    variables = template["Resources"]["LauncherFunction"]["Properties"]["Environment"]["Variables"]
    unknown = set(variables) - known
    assert not unknown, f"the launcher does not read {sorted(unknown)}"
    required = {"S3SPOT_LAUNCH_TEMPLATE", "S3SPOT_WORKER_URI", "S3SPOT_WORKER_SHA256"}
    assert required <= set(variables), sorted(required - set(variables))
    # The results prefix the function is told is the one the instance role may write to, and
    # the one the default skip rule ("analysis") covers, so results never re-trigger a launch.
    prefix = variables["S3SPOT_RESULTS_PREFIX"]
    assert prefix == "analysis/" and "S3SPOT_SKIP_SUBSTRING" not in variables
    market = template["Parameters"]["Market"]["AllowedValues"]
    assert market == ["spot", "on-demand", "spot-then-on-demand"]
    for value in market:
        assert f'"{value}"' in config, f"the launcher does not accept market {value}"


def check_alarms(template):
    alarms = resources_of_type(template, "AWS::CloudWatch::Alarm")
    dlq = [
        a["Properties"]
        for a in alarms.values()
        if a["Properties"].get("Namespace") == "AWS/SQS"
        and a["Properties"]["Dimensions"]
        == [{"Name": "QueueName", "Value": {"Fn::GetAtt": ["DeadLetterQueue", "QueueName"]}}]
    ]
    assert len(dlq) == 1, "no alarm on the dead-letter queue"
    assert dlq[0]["MetricName"] == "ApproximateNumberOfMessagesVisible"
    assert (dlq[0]["ComparisonOperator"], dlq[0]["Threshold"]) == ("GreaterThanThreshold", 0)
    errors = [
        a["Properties"]
        for a in alarms.values()
        if a["Properties"].get("Namespace") == "AWS/Lambda"
        and a["Properties"].get("MetricName") == "Errors"
    ]
    assert len(errors) == 1, "no alarm on function errors"
    assert errors[0]["Dimensions"] == [{"Name": "FunctionName", "Value": {"Ref": "LauncherFunction"}}]
    # The failed-records alarms watch exactly the metrics the function writes.
    report = (ROOT / "lambda" / "src" / "report.rs").read_text()
    (namespace,) = re.findall(r'pub const METRICS_NAMESPACE: &str = "([^"]+)";', report)
    for name in ("FailedRecords", "RetryableRecords"):
        assert f'"{name}"' in report, f"the function no longer writes {name}"
    assert '"Dimensions": [["Pipeline"]]' in report
    variables = template["Resources"]["LauncherFunction"]["Properties"]["Environment"]["Variables"]
    dimensions = [{"Name": "Pipeline", "Value": variables["S3SPOT_PIPELINE"]}]
    assert "FailedRecordsAlarm" in alarms, "no alarm on the function's failed records"
    failed = alarms["FailedRecordsAlarm"]["Properties"]
    stats = {
        query["Id"]: query["MetricStat"]
        for query in failed["Metrics"]
        if "MetricStat" in query
    }
    for query_id, name in (("failed", "FailedRecords"), ("retryable", "RetryableRecords")):
        metric = stats[query_id]["Metric"]
        assert (metric["Namespace"], metric["MetricName"]) == (namespace, name), metric
        assert metric["Dimensions"] == dimensions, metric
        assert stats[query_id]["Stat"] == "Sum"
    (returned,) = [q for q in failed["Metrics"] if q.get("ReturnData", True)]
    assert returned["Expression"].replace(" ", "") == "FILL(failed,0)-FILL(retryable,0)", returned
    assert (failed["ComparisonOperator"], failed["Threshold"]) == ("GreaterThanThreshold", 0)
    periods = {s["Period"] for s in stats.values()}
    assert max(periods) * failed["EvaluationPeriods"] <= 600, "alarms within minutes"
    assert "WaitingRecordsAlarm" in alarms, "no alarm on records waiting for long"
    waiting = alarms["WaitingRecordsAlarm"]["Properties"]
    assert (waiting["Namespace"], waiting["MetricName"]) == (namespace, "RetryableRecords")
    assert waiting["Dimensions"] == dimensions
    assert waiting["DatapointsToAlarm"] == waiting["EvaluationPeriods"], "only when it lasts"
    # A waiting record comes back once per visibility timeout: a longer one would leave periods
    # without a datapoint, and the alarm could never see six in a row.
    visibility = template["Resources"]["IntakeQueue"]["Properties"]["VisibilityTimeout"]
    assert visibility <= waiting["Period"], (visibility, waiting["Period"])
    (budget,) = resources_of_type(template, "AWS::Budgets::Budget").values()
    assert budget["Condition"] == "HasBudget"
    assert budget["Properties"]["Budget"]["BudgetLimit"]["Amount"] == {"Ref": "MonthlyBudget"}


def check_checkov_skips_explained(template):
    for name, resource in template["Resources"].items():
        for skip in resource.get("Metadata", {}).get("checkov", {}).get("skip", []):
            assert re.fullmatch(r"CKV2?_AWS_\d+", skip.get("id", "")), f"{name}: {skip}"
            assert len(skip.get("comment", "").strip()) >= 20, f"{name}: {skip['id']} has no reason"


def check_parameters(template):
    params = template["Parameters"]
    for name in (
        "InstanceTypes",
        "Market",
        "MaxInstances",
        "Command",
        "MaxRuntime",
        "ImageId",
        "SubnetId",
        "SshCidr",
        "KeyPairName",
        "MonthlyBudget",
        "NotificationEmail",
        "NotifyEmail",
        "NotifyStates",
        "WorkerKey",
        "WorkerSha256",
        "Architecture",
    ):
        assert name in params, f"parameter {name} is missing"
    assert params["ImageId"]["Default"].startswith("/aws/service/ami-amazon-linux-latest/al2023-")
    assert params["KeyPairName"]["Default"] == ""
    # The launch template always names a subnet: it is required, and must be one.
    assert params["SubnetId"]["Type"] == "AWS::EC2::Subnet::Id" and "Default" not in params["SubnetId"]
    assert params["MonthlyBudget"]["Default"] == 0


def check_job_events(template):
    """The launcher (and reaper), the worker and the operators put job state changes on the
    default bus as s3spot's own events, and nothing else of EventBridge; the names are the ones
    the events are sent with."""
    found = {}
    for where, document in policy_documents(template):
        for s in statements(document):
            if any(a.startswith("events:") for a in as_list(s["Action"])):
                found.setdefault(where.split("/")[0], []).append(s)
    assert sorted(found) == [
        "BatchJobRole", "InstanceRole", "LauncherRole", "OperatorPolicy"
    ], sorted(found)
    for where, found_statements in found.items():
        assert found_statements == [PUT_JOB_EVENTS], (
            f"{where}: events:PutEvents on the default bus, for source {EVENT_SOURCE!r} and "
            f"detail type {EVENT_DETAIL_TYPE!r} only: {found_statements}"
        )
    source = EVENTS_RS.read_text()
    assert f'pub const EVENT_SOURCE: &str = "{EVENT_SOURCE}";' in source, "the events' source"
    assert f'pub const EVENT_DETAIL_TYPE: &str = "{EVENT_DETAIL_TYPE}";' in source, (
        "the events' detail type"
    )
    assert "event_bus_name" not in source, "the events go to the default bus"


def check_notifications(template):
    """With NotifyEmail, and only with it: this pipeline's job state changes of NotifyStates go
    by e-mail, through a topic encrypted with a key of its own that EventBridge may use for that
    topic only, and that only EventBridge may publish to, from the one rule."""
    params = template["Parameters"]
    email, wanted = params["NotifyEmail"], params["NotifyStates"]
    assert (email["Type"], email["Default"]) == ("String", "")
    pattern = re.compile(email["AllowedPattern"])
    for good in ("", "me@example.com", "ops+s3spot@mail.example.co.uk"):
        assert pattern.fullmatch(good), good
    for bad in ("me", "me@example", "me@example.com,you@example.com", "me @example.com",
                " me@example.com", "<me@example.com>", "me@example.com\n"):
        assert not pattern.fullmatch(bad), bad
    states = job_states()
    assert (wanted["Type"], wanted["Default"]) == ("CommaDelimitedList", "failed,timed_out")
    # CloudFormation matches a CommaDelimitedList's pattern against each of its values.
    pattern = re.compile(wanted["AllowedPattern"])
    assert [s for s in states if pattern.fullmatch(s)] == states, "every state may be chosen"
    for bad in ("", "failed,timed_out", " failed", "FAILED", "timed-out", "done"):
        assert not pattern.fullmatch(bad), bad
    assert all(s in states for s in wanted["Default"].split(","))
    assert all(s in wanted["Description"] for s in states), "NotifyStates lists the states"
    assert template["Conditions"]["NotifiesByEmail"] == {
        "Fn::Not": [{"Fn::Equals": [{"Ref": "NotifyEmail"}, ""]}]
    }

    resources = template["Resources"]
    for name, kind in NOTIFICATION_RESOURCES.items():
        assert resources[name]["Type"] == kind, name
        assert resources[name].get("Condition") == "NotifiesByEmail", (
            f"{name} must exist only when NotifyEmail is set"
        )
    # What refers to them exists only with them too, or a stack without NotifyEmail would not
    # deploy.
    for name, resource in resources.items():
        if name not in NOTIFICATION_RESOURCES and refers_to(resource, NOTIFICATION_RESOURCES):
            assert resource.get("Condition") == "NotifiesByEmail", name
    for name, output in template["Outputs"].items():
        if refers_to(output, NOTIFICATION_RESOURCES):
            assert output.get("Condition") == "NotifiesByEmail", name
    assert template["Outputs"]["NotifyTopicArn"]["Value"] == {"Ref": "NotifyTopic"}

    topic = resources["NotifyTopic"]["Properties"]
    # EventBridge cannot publish to a topic encrypted with the AWS-managed key (alias/aws/sns).
    assert topic.get("KmsMasterKeyId") == {"Fn::GetAtt": ["NotifyKey", "Arn"]}, topic
    topic_arn = "arn:${AWS::Partition}:sns:${AWS::Region}:${AWS::AccountId}:" + sub_text(
        topic["TopicName"]
    )
    key = resources["NotifyKey"]["Properties"]
    assert key.get("EnableKeyRotation") is True, "the key rotates"
    (document,) = [d for where, d in key_policies(template) if where.startswith("NotifyKey ")]
    admins = [s for s in statements(document) if "AWS" in s["Principal"]]
    users = [s for s in statements(document) if "Service" in s["Principal"]]
    assert len(admins) + len(users) == len(statements(document)) == 2, document
    (admin,) = admins
    assert admin["Principal"] == {
        "AWS": {"Fn::Sub": "arn:${AWS::Partition}:iam::${AWS::AccountId}:root"}
    }, admin["Principal"]
    for needed in ("kms:PutKeyPolicy", "kms:DescribeKey", "kms:EnableKeyRotation",
                   "kms:TagResource", "kms:ScheduleKeyDeletion"):
        assert any(fnmatch.fnmatchcase(needed, a) for a in as_list(admin["Action"])), (
            f"the account administers the key: {needed}"
        )
    for crypto in KMS_CRYPTO:
        assert not any(fnmatch.fnmatchcase(crypto, a) for a in as_list(admin["Action"])), (
            f"the administrators may not {crypto}"
        )
    (user,) = users
    assert user["Principal"] == {"Service": "events.amazonaws.com"}, user["Principal"]
    assert sorted(as_list(user["Action"])) == ["kms:Decrypt", "kms:GenerateDataKey"], user
    # The SNS Developer Guide: aws:SourceArn, aws:SourceAccount and aws:SourceOrgID in a key
    # policy are not supported for EventBridge-to-encrypted topics; with them, nothing arrives.
    assert not re.search(r"aws:Source", json.dumps(document), re.I), (
        "no aws:Source* key in the key policy: EventBridge's deliveries would be refused"
    )
    assert user.get("Condition") == {
        "StringEquals": {"kms:EncryptionContext:aws:sns:topicArn": {"Fn::Sub": topic_arn}}
    }, f"EventBridge may use the key for the notification topic only: {user.get('Condition')}"

    subscription = resources["NotifySubscription"]["Properties"]
    assert subscription == {
        "TopicArn": {"Ref": "NotifyTopic"},
        "Protocol": "email",
        "Endpoint": {"Ref": "NotifyEmail"},
    }, subscription

    policy = resources["NotifyTopicPolicy"]["Properties"]
    assert policy["Topics"] == [{"Ref": "NotifyTopic"}]
    # EventBridge and nothing else; no Condition, which EventBridge does not support in an SNS
    # topic policy. The rule below is what ties it: the only target of the topic.
    assert statements(policy["PolicyDocument"]) == [
        {
            "Sid": "JobStateChangesFromEventBridge",
            "Effect": "Allow",
            "Principal": {"Service": "events.amazonaws.com"},
            "Action": "sns:Publish",
            "Resource": {"Ref": "NotifyTopic"},
        }
    ], policy["PolicyDocument"]
    targeting = [
        name
        for name, r in resources_of_type(template, "AWS::Events::Rule").items()
        if any(refers_to(target["Arn"], ["NotifyTopic"]) for target in r["Properties"]["Targets"])
    ]
    assert targeting == ["NotifyRule"], f"only NotifyRule publishes to the topic: {targeting}"

    rule = resources["NotifyRule"]["Properties"]
    assert rule.get("EventBusName", "default") == "default", "the bus the events are put on"
    assert rule["State"] == "ENABLED"
    assert rule["EventPattern"] == {
        "source": [EVENT_SOURCE],
        "detail-type": [EVENT_DETAIL_TYPE],
        "detail": {"pipeline": [{"Ref": "PipelineName"}], "state": {"Ref": "NotifyStates"}},
    }, rule["EventPattern"]
    (target,) = rule["Targets"]
    assert target["Arn"] == {"Ref": "NotifyTopic"}
    # The topic policy grants EventBridge itself; a role here would publish as the role.
    assert "RoleArn" not in target
    transformer = target["InputTransformer"]
    paths, message = transformer["InputPathsMap"], transformer["InputTemplate"]
    assert message.startswith('"') and message.endswith('"'), "a string input is quoted"
    used = set(re.findall(r"<([^<>]+)>", message))
    assert used == set(paths), f"variables used {sorted(used)}, defined {sorted(paths)}"
    # Every path names a field the events have.
    source = EVENTS_RS.read_text()
    fields = {f"$.detail.{f}" for f in rust_struct_fields(source, "JobEvent")}
    fields |= {f"$.detail.results.{f}" for f in rust_struct_fields(source, "EventResults")}
    fields |= {"$.time"}
    unknown = set(paths.values()) - fields
    assert not unknown, f"the events have no {sorted(unknown)}"
    for field in ("pipeline", "state", "attempt", "error", "results.status"):
        assert any(v == f"$.detail.{field}" for v in paths.values()), f"the e-mail names {field}"
    bucket = next(k for k, v in paths.items() if v == "$.detail.bucket")
    key_var = next(k for k, v in paths.items() if v == "$.detail.key")
    assert f"s3://<{bucket}>/<{key_var}>" in message, "the e-mail names the upload"


BATCH_RESOURCES = [
    "BatchInstanceRole", "BatchInstanceProfile", "BatchLaunchTemplate", "BatchComputeEnvironment",
    "BatchJobQueue", "BatchJobRole", "BatchJobDefinition", "BatchJobsPolicy",
]
JOB_ARN = "arn:${AWS::Partition}:batch:${AWS::Region}:${AWS::AccountId}:job/*"


def check_batch_backend(template):
    """Backend=batch: spot capacity that scales to zero, IMDS out of the containers' reach, a
    queue that cancels jobs stuck RUNNABLE, retries on host loss alone, the worker's own
    permissions for the jobs, and the launcher's Batch permissions on its own jobs only."""
    resources = template["Resources"]
    for name in BATCH_RESOURCES:
        assert resources[name].get("Condition") == "UsesBatch", f"{name} exists only with batch"
    assert template["Conditions"]["UsesBatch"] == {"Fn::Equals": [{"Ref": "Backend"}, "batch"]}

    compute = resources["BatchComputeEnvironment"]["Properties"]
    assert compute["Type"] == "MANAGED"
    capacity = compute["ComputeResources"]
    assert capacity["Type"] == "SPOT"
    assert capacity["AllocationStrategy"] == "SPOT_PRICE_CAPACITY_OPTIMIZED"
    assert capacity["MinvCpus"] == 0, "nothing runs, and nothing bills, on an empty queue"
    assert capacity["MaxvCpus"] == {"Ref": "BatchMaxVcpus"}
    assert capacity["InstanceTypes"] == {"Ref": "InstanceTypes"}
    assert capacity["LaunchTemplate"]["LaunchTemplateId"] == {"Ref": "BatchLaunchTemplate"}
    assert capacity["Ec2Configuration"] == [{"ImageType": "ECS_AL2023"}]
    data = resources["BatchLaunchTemplate"]["Properties"]["LaunchTemplateData"]
    assert data["MetadataOptions"] == {
        "HttpTokens": "required",
        "HttpEndpoint": "enabled",
        "HttpPutResponseHopLimit": 1,
    }, "IMDSv2, one hop"
    # Batch runs ECS jobs in the host's network: the hosts' own rules keep the commands' uids
    # from the metadata service, the ECS credentials endpoint and the agent.
    user_data = data.get("UserData", {}).get("Fn::Base64", "")
    firewall = (ROOT / "infra" / "batch-host-firewall.sh").read_text()
    assert firewall in user_data, "the Batch hosts run infra/batch-host-firewall.sh at boot"
    assert user_data.startswith("MIME-Version: 1.0\n"), "Batch takes MIME multi-part user data"
    for blocked in ("169.254.169.254", "169.254.170.2", "fd00:ec2::254", "51678-51679"):
        assert blocked in firewall, f"the hosts' firewall blocks {blocked}"
    for mapping in data["BlockDeviceMappings"]:
        assert mapping["Ebs"]["Encrypted"] is True

    queue = resources["BatchJobQueue"]["Properties"]
    assert [o["ComputeEnvironment"] for o in queue["ComputeEnvironmentOrder"]] == [
        {"Ref": "BatchComputeEnvironment"}
    ]
    actions = queue.get("JobStateTimeLimitActions", [])
    assert {a["Reason"] for a in actions} >= {"CAPACITY:INSUFFICIENT_INSTANCE_CAPACITY"}
    for action in actions:
        assert action["State"] == "RUNNABLE" and action["Action"] == "CANCEL", action
        assert action["MaxTimeSeconds"] == {"Ref": "BatchMaxRunnableSeconds"}, action

    definition = resources["BatchJobDefinition"]["Properties"]
    retry = definition["RetryStrategy"]
    assert retry["Attempts"] > 1
    rules = retry["EvaluateOnExit"]
    assert rules[0] == {"OnStatusReason": "Host EC2*", "Action": "RETRY"}, rules
    assert rules[-1] == {"OnReason": "*", "Action": "EXIT"}, "any other end is the job's outcome"
    assert all(r["Action"] == "EXIT" for r in rules[1:]), rules
    container = definition["ContainerProperties"]
    assert container["JobRoleArn"] == {"Fn::GetAtt": ["BatchJobRole", "Arn"]}
    assert container["Command"][:2] == ["bash", "-c"]
    assert len(json.dumps(container["Command"])) < 512, (
        "Batch sends the command with each job's overrides (8,192 characters in all): it only "
        "starts the script, which is the job definition's environment"
    )
    assert any(e["Name"] == "S3SPOT_BOOTSTRAP_SCRIPT" for e in container["Environment"])
    assert not container.get("Privileged"), "a job's container is never privileged"
    assert definition["PlatformCapabilities"] == ["EC2"]

    # The jobs' role: exactly the instance role's statements for the worker.
    worker_sids = {
        "ReadInputs", "WriteResultsOnly", "NeverTheLaunchersClaims",
        "PutJobEventsOnTheDefaultBus", "ReadTheWorkerBinary",
    }
    instance = [s for s in role_statements(template, "InstanceRole") if s["Sid"] in worker_sids]
    job = role_statements(template, "BatchJobRole")
    assert job == instance, "BatchJobRole grants what InstanceRole grants the worker, no more"
    trust = resources["BatchJobRole"]["Properties"]["AssumeRolePolicyDocument"]["Statement"]
    assert [t["Principal"] for t in trust] == [{"Service": "ecs-tasks.amazonaws.com"}]
    assert all("aws:SourceAccount" in t["Condition"]["StringEquals"] for t in trust)

    policy = resources["BatchJobsPolicy"]["Properties"]
    assert policy["Roles"] == [{"Ref": "LauncherRole"}]
    grants = {}
    for s in statements(policy["PolicyDocument"]):
        assert s["Effect"] == "Allow"
        for action in as_list(s["Action"]):
            grants.setdefault(action, []).append(s)
    assert sorted(grants) == [
        "batch:DescribeJobs", "batch:ListJobs", "batch:SubmitJob", "batch:TagResource",
        "batch:TerminateJob",
    ], sorted(grants)
    (submit,) = grants["batch:SubmitJob"]
    assert {sub_text(r) for r in as_list(submit["Resource"])} == {
        "arn:${AWS::Partition}:batch:${AWS::Region}:${AWS::AccountId}:job-queue/${PipelineName}-jobs",
        "arn:${AWS::Partition}:batch:${AWS::Region}:${AWS::AccountId}:job-definition/${PipelineName}-job:*",
        JOB_ARN,
    }, "the pipeline's queue and job definition only"
    assert resources["BatchJobQueue"]["Properties"]["JobQueueName"] == {
        "Fn::Sub": "${PipelineName}-jobs"
    }
    assert resources["BatchJobDefinition"]["Properties"]["JobDefinitionName"] == {
        "Fn::Sub": "${PipelineName}-job"
    }
    (tag,) = grants["batch:TagResource"]
    assert tag.get("Condition") == {"ForAllValues:StringLike": {"aws:TagKeys": "s3spot:*"}}, tag
    (terminate,) = grants["batch:TerminateJob"]
    assert [sub_text(r) for r in as_list(terminate["Resource"])] == [JOB_ARN]
    assert terminate.get("Condition") == {
        "StringEquals": {"aws:ResourceTag/s3spot:pipeline": {"Ref": "PipelineName"}}
    }, "only the pipeline's own jobs"

    env = function_environment(template)
    assert env.get("S3SPOT_BACKEND") == {"Ref": "Backend"}
    assert env.get("S3SPOT_BATCH_JOB_QUEUE") == {"Fn::If": ["UsesBatch", {"Ref": "BatchJobQueue"}, ""]}
    assert env.get("S3SPOT_BATCH_JOB_DEFINITION") == {
        "Fn::If": ["UsesBatch", {"Ref": "BatchJobDefinition"}, ""]
    }
    assert env["S3SPOT_MARKET"] == {"Fn::If": ["UsesBatch", "", {"Ref": "Market"}]}


def function_environment(template):
    (function,) = resources_of_type(template, "AWS::Lambda::Function").values()
    return function["Properties"]["Environment"]["Variables"]


def check_parameter_groups(template):
    """The console shows every parameter, in one group each."""
    groups = template["Metadata"]["AWS::CloudFormation::Interface"]["ParameterGroups"]
    listed = [p for group in groups for p in group["Parameters"]]
    assert sorted(listed) == sorted(template["Parameters"]), (
        sorted(set(template["Parameters"]) ^ set(listed)),
        sorted({p for p in listed if listed.count(p) > 1}),
    )


CHECKS = [
    check_operator_policy,
    check_no_wildcard_actions,
    check_resource_star_only_where_required,
    check_pass_role_scoped,
    check_run_instances_conditioned,
    check_create_tags_only_at_launch,
    check_launcher_role_exact,
    check_instance_role_exact,
    check_launch_template,
    check_no_ingress_by_default,
    check_buckets_hardened,
    check_intake,
    check_function,
    check_environment_matches_launcher,
    check_alarms,
    check_reaper_scheduled,
    check_checkov_skips_explained,
    check_parameters,
    check_job_events,
    check_notifications,
    check_parameter_groups,
    check_batch_backend,
]


# ---------------------------------------------------------------------------------------- tests


class TemplateProperties(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.template = transformed()

    def test_every_property_holds(self):
        for check in CHECKS:
            with self.subTest(check=check.__name__):
                check(self.template)

    def test_the_transform_made_the_function_and_its_queue_source(self):
        kinds = {r["Type"] for r in self.template["Resources"].values()}
        self.assertIn("AWS::Lambda::Function", kinds)
        self.assertIn("AWS::Lambda::EventSourceMapping", kinds)
        self.assertNotIn("AWS::Serverless::Function", kinds)
        # The transform adds no role or policy of its own: the function uses LauncherRole.
        roles = set(resources_of_type(self.template, "AWS::IAM::Role"))
        self.assertEqual(
            roles, {"LauncherRole", "InstanceRole", "BatchInstanceRole", "BatchJobRole"}
        )


class EveryStatementSaysWhy(unittest.TestCase):
    """Each statement of each policy has a Sid and, right above it in the template, a comment
    that says why it allows (or denies) what it does."""

    @staticmethod
    def unexplained(text):
        lines = text.splitlines()
        return [
            line.strip()
            for i, line in enumerate(lines)
            if re.match(r"\s*- Sid: ", line) and not lines[i - 1].strip().startswith("#")
        ]

    def test_every_statement_is_named_and_explained(self):
        template = source()
        for where, document in [*policy_documents(template), *key_policies(template)]:
            if "trust policy" in where:
                continue
            for s in statements(document):
                self.assertIn("Sid", s, f"{where}: a statement without a Sid")
        self.assertEqual(self.unexplained((ROOT / "infra" / "template.yaml").read_text()), [])

    def test_an_unexplained_statement_is_found(self):
        text = "Statement:\n  # why\n  - Sid: A\n    Effect: Allow\n  - Sid: B\n"
        self.assertEqual(self.unexplained(text), ["- Sid: B"])


def weakened(edit):
    """The transformed template with one edit applied."""
    template = copy.deepcopy(TemplateProperties.template)
    edit(template)
    return template


class ChecksFailOnWeakenedTemplates(unittest.TestCase):
    """Each check catches the weakness it is about."""

    @classmethod
    def setUpClass(cls):
        if not hasattr(TemplateProperties, "template"):
            TemplateProperties.setUpClass()

    def expect_failure(self, check, edit):
        with self.assertRaises(AssertionError):
            check(weakened(edit))

    def statement(self, template, role, sid):
        (s,) = [s for s in role_statements(template, role) if s.get("Sid") == sid]
        return s

    def test_wildcard_action(self):
        self.expect_failure(
            check_no_wildcard_actions,
            lambda t: self.statement(t, "LauncherRole", "TagOnlyAtLaunch").update(Action="ec2:*"),
        )

    def test_resource_star(self):
        self.expect_failure(
            check_resource_star_only_where_required,
            lambda t: self.statement(t, "InstanceRole", "WriteResultsOnly").update(Resource="*"),
        )

    def test_pass_role_on_any_role(self):
        self.expect_failure(
            check_pass_role_scoped,
            lambda t: self.statement(t, "LauncherRole", "PassOnlyTheInstanceRole").update(
                Resource="arn:aws:iam::123456789012:role/*"
            ),
        )

    def test_pass_role_to_any_service(self):
        self.expect_failure(
            check_pass_role_scoped,
            lambda t: self.statement(t, "LauncherRole", "PassOnlyTheInstanceRole").pop("Condition"),
        )

    def test_run_instances_without_template_condition(self):
        self.expect_failure(
            check_run_instances_conditioned,
            lambda t: self.statement(t, "LauncherRole", "OnlyTemplateResources")["Condition"].pop(
                "Bool"
            ),
        )

    def test_run_instances_any_instance_type(self):
        self.expect_failure(
            check_run_instances_conditioned,
            lambda t: self.statement(t, "LauncherRole", "OnlyTemplateInstances")["Condition"][
                "StringLike"
            ].pop("ec2:InstanceType"),
        )

    def test_volumes_of_any_size(self):
        self.expect_failure(
            check_run_instances_conditioned,
            lambda t: self.statement(t, "LauncherRole", "BoundedVolumes")["Condition"].pop(
                "NumericLessThanEquals"
            ),
        )

    def test_subnets_of_any_vpc(self):
        self.expect_failure(
            check_run_instances_conditioned,
            lambda t: self.statement(t, "LauncherRole", "OnlyThePipelinesVpc")["Condition"].pop(
                "ArnEquals"
            ),
        )

    def test_extra_launcher_permission(self):
        self.expect_failure(
            check_launcher_role_exact,
            lambda t: self.statement(t, "LauncherRole", "ReadAndDeleteIntakeMessages")[
                "Action"
            ].append("sqs:SendMessage"),
        )

    def test_instance_may_write_inputs(self):
        self.expect_failure(
            check_instance_role_exact,
            lambda t: self.statement(t, "InstanceRole", "WriteResultsOnly").update(
                Resource={"Fn::Sub": "${DataBucket.Arn}/*"}
            ),
        )

    def test_instance_may_forge_claims(self):
        def edit(t):
            statements = t["Resources"]["InstanceRole"]["Properties"]["Policies"][0][
                "PolicyDocument"
            ]["Statement"]
            statements[:] = [s for s in statements if s.get("Sid") != "NeverTheLaunchersClaims"]

        self.expect_failure(check_instance_role_exact, edit)

    def test_imdsv1(self):
        self.expect_failure(
            check_launch_template,
            lambda t: t["Resources"]["WorkerLaunchTemplate"]["Properties"]["LaunchTemplateData"][
                "MetadataOptions"
            ].update(HttpTokens="optional"),
        )

    def test_stop_on_shutdown(self):
        self.expect_failure(
            check_launch_template,
            lambda t: t["Resources"]["WorkerLaunchTemplate"]["Properties"][
                "LaunchTemplateData"
            ].update(InstanceInitiatedShutdownBehavior="stop"),
        )

    def test_unencrypted_root_volume(self):
        self.expect_failure(
            check_launch_template,
            lambda t: t["Resources"]["WorkerLaunchTemplate"]["Properties"]["LaunchTemplateData"][
                "BlockDeviceMappings"
            ][0]["Ebs"].update(Encrypted=False),
        )

    def test_ssh_open_by_default(self):
        self.expect_failure(
            check_no_ingress_by_default,
            lambda t: t["Resources"]["WorkerSecurityGroup"]["Properties"].update(
                SecurityGroupIngress=[
                    {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "CidrIp": "0.0.0.0/0"}
                ]
            ),
        )

    def test_public_access_allowed(self):
        self.expect_failure(
            check_buckets_hardened,
            lambda t: t["Resources"]["DataBucket"]["Properties"][
                "PublicAccessBlockConfiguration"
            ].update(RestrictPublicBuckets=False),
        )

    def test_no_tls_deny(self):
        self.expect_failure(
            check_buckets_hardened,
            lambda t: t["Resources"].pop("ArtifactsBucketPolicy"),
        )

    def test_no_versioning(self):
        self.expect_failure(
            check_buckets_hardened,
            lambda t: t["Resources"]["DataBucket"]["Properties"].pop("VersioningConfiguration"),
        )

    def test_no_redrive(self):
        self.expect_failure(
            check_intake,
            lambda t: t["Resources"]["IntakeQueue"]["Properties"].pop("RedrivePolicy"),
        )

    def test_no_partial_batch_response(self):
        def edit(t):
            (mapping,) = resources_of_type(t, "AWS::Lambda::EventSourceMapping").values()
            mapping["Properties"].pop("FunctionResponseTypes")

        self.expect_failure(check_intake, edit)

    def test_events_from_any_rule(self):
        def edit(t):
            policy = t["Resources"]["IntakeQueuePolicy"]["Properties"]["PolicyDocument"]
            for s in policy["Statement"]:
                if s.get("Sid") == "UploadsAndSpotInterruptionWarnings":
                    s.pop("Condition")

        self.expect_failure(check_intake, edit)

    def test_results_reach_the_queue(self):
        self.expect_failure(
            check_intake,
            lambda t: t["Resources"]["UploadsRule"]["Properties"]["EventPattern"]["detail"].pop(
                "object"
            ),
        )

    def test_every_object_notified_to_the_queue(self):
        self.expect_failure(
            check_intake,
            lambda t: t["Resources"]["DataBucket"]["Properties"].update(
                NotificationConfiguration={
                    "QueueConfigurations": [
                        {"Event": "s3:ObjectCreated:*", "Queue": {"Fn::GetAtt": ["IntakeQueue", "Arn"]}}
                    ]
                }
            ),
        )

    def test_uploads_lost_when_delivery_fails(self):
        def edit(t):
            (target,) = t["Resources"]["UploadsRule"]["Properties"]["Targets"]
            target.pop("DeadLetterConfig")

        self.expect_failure(check_intake, edit)

    def test_bucket_sends_before_the_rule_exists(self):
        self.expect_failure(
            check_intake, lambda t: t["Resources"]["DataBucket"].update(DependsOn="IntakeQueuePolicy")
        )

    def test_instance_role_with_the_ssm_managed_policy(self):
        self.expect_failure(
            check_instance_role_exact,
            lambda t: t["Resources"]["InstanceRole"]["Properties"].update(
                ManagedPolicyArns=["arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore"]
            ),
        )

    def test_instance_role_reads_parameters(self):
        def edit(t):
            for s in role_statements(t, "InstanceRole"):
                if s.get("Sid") == "SessionManagerRequiresWildcard":
                    s["Action"] = s["Action"] + ["ssm:GetParameters"]

        self.expect_failure(check_instance_role_exact, edit)

    def test_launch_template_without_a_security_group(self):
        self.expect_failure(
            check_launch_template,
            lambda t: t["Resources"]["WorkerLaunchTemplate"]["Properties"]["LaunchTemplateData"].pop(
                "SecurityGroupIds"
            ),
        )

    def test_subnet_optional(self):
        self.expect_failure(
            check_parameters,
            lambda t: t["Parameters"]["SubnetId"].update(Type="String", Default=""),
        )

    def test_interruption_rule_matches_other_events(self):
        self.expect_failure(
            check_intake,
            lambda t: t["Resources"]["SpotInterruptionRule"]["Properties"]["EventPattern"].pop(
                "detail-type"
            ),
        )

    def test_launcher_writes_any_object(self):
        def edit(t):
            for s in role_statements(t, "LauncherRole"):
                if s.get("Sid") == "RecordJobAttempts":
                    s["Resource"] = {"Fn::Sub": "${DataBucket.Arn}/*"}

        self.expect_failure(check_launcher_role_exact, edit)

    def test_launcher_writes_any_analysis_object(self):
        def edit(t):
            for s in role_statements(t, "LauncherRole"):
                if s.get("Sid") == "RecordJobAttempts":
                    s["Resource"][1] = {"Fn::Sub": "${DataBucket.Arn}/analysis/*"}

        self.expect_failure(check_launcher_role_exact, edit)

    def test_launcher_reads_any_user_data(self):
        def edit(t):
            for s in role_statements(t, "LauncherRole"):
                if s.get("Sid") == "ReadOwnInstancesUserData":
                    s.pop("Condition")

        self.expect_failure(check_launcher_role_exact, edit)

    def test_launcher_reads_any_console(self):
        def edit(t):
            for s in role_statements(t, "LauncherRole"):
                if s.get("Sid") == "ReadOwnInstancesConsole":
                    s.pop("Condition")

        self.expect_failure(check_launcher_role_exact, edit)

    def test_launcher_terminates_any_instance(self):
        def edit(t):
            for s in role_statements(t, "LauncherRole"):
                if s.get("Sid") == "TerminateOwnInstances":
                    s.pop("Condition")

        self.expect_failure(check_launcher_role_exact, edit)

    def test_no_reaper(self):
        def edit(t):
            for name, r in list(t["Resources"].items()):
                if r["Type"] == "AWS::Events::Rule" and "ScheduleExpression" in r["Properties"]:
                    del t["Resources"][name]

        self.expect_failure(check_reaper_scheduled, edit)

    def test_uploads_rule_names_another_bucket(self):
        self.expect_failure(
            check_intake,
            lambda t: t["Resources"]["DataBucket"]["Properties"].update(
                BucketName={"Fn::Sub": "${PipelineName}-input-${AWS::AccountId}"}
            ),
        )

    def test_no_reserved_concurrency(self):
        self.expect_failure(
            check_function,
            lambda t: t["Resources"]["LauncherFunction"]["Properties"].pop(
                "ReservedConcurrentExecutions"
            ),
        )

    def test_text_logs(self):
        self.expect_failure(
            check_function,
            lambda t: t["Resources"]["LauncherFunction"]["Properties"]["LoggingConfig"].update(
                LogFormat="Text"
            ),
        )

    def test_misspelt_variable(self):
        def edit(t):
            variables = t["Resources"]["LauncherFunction"]["Properties"]["Environment"]["Variables"]
            variables["S3SPOT_MAX_INSTANCE"] = variables.pop("S3SPOT_MAX_INSTANCES")

        self.expect_failure(check_environment_matches_launcher, edit)

    def test_operator_policy_reads_every_result(self):
        def edit(t):
            for s in t["Resources"]["OperatorPolicy"]["Properties"]["PolicyDocument"]["Statement"]:
                if s["Sid"] == "ReadJobLogs":
                    s["Resource"] = {"Fn::Sub": "${DataBucket.Arn}/analysis/*"}

        self.expect_failure(check_operator_policy, edit)

    def batch(self, template, name):
        return template["Resources"][name]["Properties"]

    def test_batch_compute_that_never_scales_to_zero(self):
        self.expect_failure(
            check_batch_backend,
            lambda t: self.batch(t, "BatchComputeEnvironment")["ComputeResources"].update(
                MinvCpus=1
            ),
        )

    def test_batch_on_demand_capacity(self):
        self.expect_failure(
            check_batch_backend,
            lambda t: self.batch(t, "BatchComputeEnvironment")["ComputeResources"].update(
                Type="EC2", AllocationStrategy="BEST_FIT_PROGRESSIVE"
            ),
        )

    def test_batch_hosts_without_the_firewall(self):
        self.expect_failure(
            check_batch_backend,
            lambda t: self.batch(t, "BatchLaunchTemplate")["LaunchTemplateData"].pop("UserData"),
        )

    def test_batch_script_in_the_command(self):
        def edit(t):
            container = self.batch(t, "BatchJobDefinition")["ContainerProperties"]
            container["Command"][2] = "x" * 8000

        self.expect_failure(check_batch_backend, edit)

    def test_batch_containers_reach_imds(self):
        self.expect_failure(
            check_batch_backend,
            lambda t: self.batch(t, "BatchLaunchTemplate")["LaunchTemplateData"][
                "MetadataOptions"
            ].update(HttpPutResponseHopLimit=2),
        )

    def test_batch_jobs_stuck_runnable_forever(self):
        self.expect_failure(
            check_batch_backend,
            lambda t: self.batch(t, "BatchJobQueue").pop("JobStateTimeLimitActions"),
        )

    def test_batch_retries_the_jobs_own_failure(self):
        self.expect_failure(
            check_batch_backend,
            lambda t: self.batch(t, "BatchJobDefinition")["RetryStrategy"][
                "EvaluateOnExit"
            ].pop(),
        )

    def test_batch_retries_nothing(self):
        self.expect_failure(
            check_batch_backend,
            lambda t: self.batch(t, "BatchJobDefinition")["RetryStrategy"][
                "EvaluateOnExit"
            ].pop(0),
        )

    def test_batch_job_role_reads_everything(self):
        def edit(t):
            for s in role_statements(t, "BatchJobRole"):
                if s["Sid"] == "ReadTheWorkerBinary":
                    s["Resource"] = {"Fn::Sub": "${ArtifactsBucket.Arn}/*"}

        self.expect_failure(check_batch_backend, edit)

    def test_batch_job_role_may_forge_claims(self):
        def edit(t):
            statements_ = self.batch(t, "BatchJobRole")["Policies"][0]["PolicyDocument"]
            statements_["Statement"] = [
                s for s in statements_["Statement"] if s["Sid"] != "NeverTheLaunchersClaims"
            ]

        self.expect_failure(check_batch_backend, edit)

    def test_batch_job_role_trusts_any_account(self):
        def edit(t):
            for s in self.batch(t, "BatchJobRole")["AssumeRolePolicyDocument"]["Statement"]:
                s["Condition"]["StringEquals"].pop("aws:SourceAccount")

        self.expect_failure(check_batch_backend, edit)

    def test_batch_privileged_container(self):
        self.expect_failure(
            check_batch_backend,
            lambda t: self.batch(t, "BatchJobDefinition")["ContainerProperties"].update(
                Privileged=True
            ),
        )

    def test_batch_submit_to_any_queue(self):
        def edit(t):
            for s in self.batch(t, "BatchJobsPolicy")["PolicyDocument"]["Statement"]:
                if s["Sid"] == "SubmitToThePipelinesQueue":
                    s["Resource"][0] = {
                        "Fn::Sub": "arn:${AWS::Partition}:batch:${AWS::Region}:${AWS::AccountId}:job-queue/*"
                    }

        self.expect_failure(check_batch_backend, edit)

    def test_batch_terminate_any_job(self):
        def edit(t):
            for s in self.batch(t, "BatchJobsPolicy")["PolicyDocument"]["Statement"]:
                if s["Sid"] == "TerminateOwnJobs":
                    s.pop("Condition")

        self.expect_failure(check_batch_backend, edit)

    def test_batch_tags_of_any_key(self):
        def edit(t):
            for s in self.batch(t, "BatchJobsPolicy")["PolicyDocument"]["Statement"]:
                if s["Sid"] == "TagJobsAtSubmit":
                    s.pop("Condition")

        self.expect_failure(check_batch_backend, edit)

    def test_batch_resources_in_an_ec2_stack(self):
        self.expect_failure(
            check_batch_backend,
            lambda t: t["Resources"]["BatchComputeEnvironment"].pop("Condition"),
        )

    def test_batch_launcher_not_told_its_queue(self):
        self.expect_failure(
            check_batch_backend,
            lambda t: function_environment(t).pop("S3SPOT_BATCH_JOB_QUEUE"),
        )

    def test_batch_cancel_any_job_with_wildcard_reads(self):
        def edit(t):
            for s in self.batch(t, "BatchJobsPolicy")["PolicyDocument"]["Statement"]:
                if s["Sid"] == "JobLookupRequiresWildcard":
                    s["Action"] = [*s["Action"], "batch:TerminateJob"]

        self.expect_failure(check_resource_star_only_where_required, edit)

    def test_operator_policy_drifts_from_the_launcher(self):
        def edit(t):
            for s in role_statements(t, "LauncherRole"):
                if s["Sid"] == "TerminateOwnInstances":
                    s["Condition"]["StringEquals"]["ec2:ResourceTag/s3spot:pipeline"] = "other"

        self.expect_failure(check_operator_policy, edit)

    def test_no_failed_records_alarm(self):
        self.expect_failure(check_alarms, lambda t: t["Resources"].pop("FailedRecordsAlarm"))

    def test_failed_records_alarm_on_another_namespace(self):
        def edit(t):
            metrics = t["Resources"]["FailedRecordsAlarm"]["Properties"]["Metrics"]
            metrics[0]["MetricStat"]["Metric"]["Namespace"] = "S3Spot"

        self.expect_failure(check_alarms, edit)

    def test_failed_records_alarm_counts_backpressure(self):
        def edit(t):
            metrics = t["Resources"]["FailedRecordsAlarm"]["Properties"]["Metrics"]
            metrics[2]["Expression"] = "FILL(failed, 0)"

        self.expect_failure(check_alarms, edit)

    def test_no_dead_letter_alarm(self):
        self.expect_failure(check_alarms, lambda t: t["Resources"].pop("DeadLetterAlarm"))

    def operator_statement(self, template, sid):
        document = template["Resources"]["OperatorPolicy"]["Properties"]["PolicyDocument"]
        (s,) = [s for s in statements(document) if s.get("Sid") == sid]
        return s

    def key_statement(self, template, sid):
        document = template["Resources"]["NotifyKey"]["Properties"]["KeyPolicy"]
        (s,) = [s for s in statements(document) if s.get("Sid") == sid]
        return s

    def test_job_events_on_any_bus(self):
        self.expect_failure(
            check_job_events,
            lambda t: self.statement(t, "LauncherRole", "PutJobEventsOnTheDefaultBus").update(
                Resource="*"
            ),
        )

    def test_job_events_of_any_source(self):
        self.expect_failure(
            check_job_events,
            lambda t: self.statement(t, "InstanceRole", "PutJobEventsOnTheDefaultBus").pop(
                "Condition"
            ),
        )

    def test_job_events_of_any_detail_type(self):
        self.expect_failure(
            check_job_events,
            lambda t: self.statement(t, "InstanceRole", "PutJobEventsOnTheDefaultBus")[
                "Condition"
            ]["ForAllValues:StringEquals"].pop("events:detail-type"),
        )

    def test_job_events_without_their_source(self):
        # ForAllValues holds for a key that is absent: without Null, it allows no source at all.
        self.expect_failure(
            check_job_events,
            lambda t: self.statement(t, "LauncherRole", "PutJobEventsOnTheDefaultBus")[
                "Condition"
            ].pop("Null"),
        )

    def test_job_events_with_another_action(self):
        self.expect_failure(
            check_job_events,
            lambda t: self.operator_statement(t, "PutJobEventsOnTheDefaultBus").update(
                Action=["events:PutEvents", "events:PutRule"]
            ),
        )

    def test_job_events_from_another_role(self):
        def edit(t):
            s = copy.deepcopy(self.statement(t, "LauncherRole", "PutJobEventsOnTheDefaultBus"))
            t["Resources"]["InstanceRole"]["Properties"]["Policies"].append(
                {"PolicyName": "more", "PolicyDocument": {"Version": "2012-10-17", "Statement": [s]}}
            )
            t["Resources"]["ArtifactsBucketPolicy"]["Properties"]["PolicyDocument"][
                "Statement"
            ].append(dict(s, Principal="*"))

        self.expect_failure(check_job_events, edit)

    def test_operator_job_events_drift_from_the_launcher(self):
        self.expect_failure(
            check_operator_policy,
            lambda t: self.operator_statement(t, "PutJobEventsOnTheDefaultBus").update(
                Resource="*"
            ),
        )

    def test_notifications_without_an_email(self):
        self.expect_failure(
            check_notifications, lambda t: t["Resources"]["NotifyRule"].pop("Condition")
        )

    def test_notification_output_without_an_email(self):
        self.expect_failure(
            check_notifications, lambda t: t["Outputs"]["NotifyTopicArn"].pop("Condition")
        )

    def test_topic_on_the_aws_managed_key(self):
        self.expect_failure(
            check_notifications,
            lambda t: t["Resources"]["NotifyTopic"]["Properties"].update(
                KmsMasterKeyId="alias/aws/sns"
            ),
        )

    def test_key_without_rotation(self):
        self.expect_failure(
            check_notifications,
            lambda t: t["Resources"]["NotifyKey"]["Properties"].update(EnableKeyRotation=False),
        )

    def test_key_for_any_topic(self):
        self.expect_failure(
            check_notifications,
            lambda t: self.key_statement(t, "EventBridgeEncryptsForTheTopic").pop("Condition"),
        )

    def test_key_policy_names_the_rule(self):
        # Documented to refuse every delivery of EventBridge to the topic.
        self.expect_failure(
            check_notifications,
            lambda t: self.key_statement(t, "EventBridgeEncryptsForTheTopic")["Condition"].update(
                ArnEquals={"aws:SourceArn": {"Fn::GetAtt": ["NotifyRule", "Arn"]}}
            ),
        )

    def test_administrators_decrypt(self):
        self.expect_failure(
            check_notifications,
            lambda t: self.key_statement(t, "AccountAdministersTheKey").update(Action="kms:*"),
        )

    def test_topic_published_by_anyone(self):
        def edit(t):
            document = t["Resources"]["NotifyTopicPolicy"]["Properties"]["PolicyDocument"]
            document["Statement"][0]["Principal"] = "*"

        self.expect_failure(check_notifications, edit)

    def test_topic_published_by_another_rule(self):
        def edit(t):
            t["Resources"]["SpotInterruptionRule"]["Properties"]["Targets"].append(
                {"Id": "email", "Arn": {"Ref": "NotifyTopic"}}
            )

        self.expect_failure(check_notifications, edit)

    def test_rule_takes_every_pipelines_events(self):
        self.expect_failure(
            check_notifications,
            lambda t: t["Resources"]["NotifyRule"]["Properties"]["EventPattern"]["detail"].pop(
                "pipeline"
            ),
        )

    def test_rule_ignores_notify_states(self):
        self.expect_failure(
            check_notifications,
            lambda t: t["Resources"]["NotifyRule"]["Properties"]["EventPattern"]["detail"].update(
                state=["failed"]
            ),
        )

    def test_message_names_what_it_does_not_read(self):
        def edit(t):
            transformer = t["Resources"]["NotifyRule"]["Properties"]["Targets"][0][
                "InputTransformer"
            ]
            transformer["InputTemplate"] = transformer["InputTemplate"][:-1] + ' on <instance>"'

        self.expect_failure(check_notifications, edit)

    def test_message_reads_what_events_lack(self):
        def edit(t):
            transformer = t["Resources"]["NotifyRule"]["Properties"]["Targets"][0][
                "InputTransformer"
            ]
            transformer["InputPathsMap"]["error"] = "$.detail.message"

        self.expect_failure(check_notifications, edit)

    def test_any_notify_state(self):
        self.expect_failure(
            check_notifications,
            lambda t: t["Parameters"]["NotifyStates"].update(AllowedPattern=".*"),
        )

    def test_parameter_outside_the_groups(self):
        def edit(t):
            groups = t["Metadata"]["AWS::CloudFormation::Interface"]["ParameterGroups"]
            for group in groups:
                group["Parameters"] = [p for p in group["Parameters"] if p != "NotifyStates"]

        self.expect_failure(check_parameter_groups, edit)

    def test_skip_without_reason(self):
        self.expect_failure(
            check_checkov_skips_explained,
            lambda t: t["Resources"]["DataBucket"]["Metadata"]["checkov"]["skip"].append(
                {"id": "CKV_AWS_21"}
            ),
        )


class SourceTemplate(unittest.TestCase):
    def test_deploys_with_sam(self):
        template = source()
        self.assertEqual(template["Transform"], "AWS::Serverless-2016-10-31")
        self.assertEqual(template["Resources"]["LauncherFunction"]["Properties"]["CodeUri"], "..")
        self.assertTrue((ROOT / "Cargo.toml").exists(), "CodeUri must point at the workspace")

if __name__ == "__main__":
    unittest.main()
