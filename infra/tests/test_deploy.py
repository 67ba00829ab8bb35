"""scripts/deploy, run for real. What it asks of the account is answered by the real AWS CLI
against moto (VPCs, subnets, instance types and offerings, the AMI's SSM parameter and image).
IAM's service-linked roles are played by a double of AWS's documented behaviour, which moto
gets wrong (it names the role AWSServiceRoleForspot and answers a duplicate differently).
cargo-lambda, objdump, CloudFormation and S3 are stand-ins that record every call, and `sam`
parses its arguments with the pinned SAM CLI's own command line (infra/requirements-deploy.txt,
installed into .venv-deploy by scripts/test), so a parameter reaches the stack as SAM reads it.
What is checked: the order of the steps, what each is given, and that every refusal comes
before the first change."""

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import unittest
import urllib.request
from pathlib import Path

from infra.tests.template import ROOT

DEPLOY_VENV = ROOT / ".venv-deploy"
MOTO_SERVER = Path(sys.executable).parent / "moto_server"
REAL_AWS = Path(sys.executable).parent / "aws"

# Each stand-in appends one JSON document per call to $CALLS.
AWS = r"""
log aws "$@"
[[ $1 == --region ]] && shift 2
case "$1 $2" in
  "cloudformation describe-stacks")
    [[ -e $STATE/stack ]] || { echo "Stack with id s3spot does not exist" >&2; exit 255; }
    case "$*" in
      *ArtifactsBucketName*) echo s3spot-artifacts-x ;;
      *DataBucketName*) echo s3spot-data-123456789012-eu-west-1 ;;
      *LauncherLogGroupName*) echo /aws/lambda/s3spot-launcher ;;
      *Parameters*) [[ ! -e $STATE/parameters ]] || cat "$STATE/parameters" ;;
      *) echo '{"Stacks": []}' ;;
    esac ;;
  "s3 cp") ;;
  # IAM as AWS documents it: the spot role's name, and InvalidInput for one that exists.
  "iam get-role")
    [[ $4 == AWSServiceRoleForEC2Spot ]] || { echo "unexpected role $4" >&2; exit 2; }
    [[ -e $STATE/spot-role ]] && { echo '{"Role": {"RoleName": "AWSServiceRoleForEC2Spot"}}'; exit 0; }
    [[ -n ${IAM_FAILS:-} ]] && { echo "An error occurred ($IAM_FAILS) when calling the GetRole operation: no" >&2; exit 254; }
    echo "An error occurred (NoSuchEntity) when calling the GetRole operation: The role with name AWSServiceRoleForEC2Spot cannot be found." >&2
    exit 254 ;;
  "iam create-service-linked-role")
    [[ $4 == spot.amazonaws.com ]] || { echo "unexpected service $4" >&2; exit 2; }
    [[ -n ${CREATE_FAILS:-} ]] && { echo "An error occurred (AccessDenied) when calling the CreateServiceLinkedRole operation: not authorized to perform: iam:CreateServiceLinkedRole" >&2; exit 254; }
    if [[ -e $STATE/spot-role || -n ${CREATED_MEANWHILE:-} ]]; then
      echo "An error occurred (InvalidInput) when calling the CreateServiceLinkedRole operation: Service role name AWSServiceRoleForEC2Spot has been taken in this account, please try a different suffix." >&2
      exit 254
    fi
    touch "$STATE/spot-role"
    echo '{"Role": {"RoleName": "AWSServiceRoleForEC2Spot"}}' ;;
  "ec2 "* | "ssm "*) exec "$REAL_AWS" --region eu-west-1 "$@" ;;
  *) echo "unexpected aws call: $*" >&2; exit 2 ;;
esac
"""

# SAM's own command line, from the pinned SAM CLI: `deploy` is parsed as `sam deploy` parses it.
SAM = r'''
import json, os, shutil, sys
from pathlib import Path

args = sys.argv[1:]
record = {"argv": ["sam", *args]}
if args[:1] == ["--version"]:
    print(os.environ.get("SAM_VERSION_LINE", "SAM CLI, version 1.170.0"))
    sys.exit(0)
if args[:1] == ["build"]:
    record["stdin"] = os.path.realpath("/proc/self/fd/0")
    out = Path(args[args.index("--build-dir") + 1])
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(args[args.index("--template-file") + 1], out / "template.yaml")
if args[:1] == ["deploy"]:
    from samcli.commands.deploy.command import cli
    ctx = cli.make_context("deploy", args[1:])
    record["parameters"] = dict(ctx.params["parameter_overrides"])
    Path(os.environ["STATE"], "stack").touch()
with open(os.environ["CALLS"], "a") as calls:
    calls.write(json.dumps(record) + "\n")
'''

STUBS = {
    "cargo": r"""
        log cargo "$@"
        mkdir -p target/lambda/s3spot-worker
        printf 'worker binary for %s\n' "$*" > target/lambda/s3spot-worker/bootstrap
        chmod +x target/lambda/s3spot-worker/bootstrap
    """,
    "cargo-lambda": "log cargo-lambda \"$@\"",
    "objdump": "echo \"0000 DF *UND* 0000 (GLIBC_2.2.5) memcpy\"; echo \"0000 DF *UND* 0000 (${NEWEST_GLIBC}) pthread_create\"",
    "aws": AWS,
}

LOG = r"""
log() {
  python3 -c 'import json, sys; print(json.dumps({"argv": sys.argv[1:]}))' "$@" >> "$CALLS"
}
"""

X86_IMAGE = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"
ARM_IMAGE = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-arm64"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Moto:
    """moto_server on loopback, for the whole module."""

    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [str(MOTO_SERVER), "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/moto-api/", timeout=1)
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("moto_server did not start")
                time.sleep(0.1)

    def ec2(self, *args):
        return json.loads(
            subprocess.run(
                [str(REAL_AWS), "--region", "eu-west-1", "--output", "json", "ec2", *args],
                env=self.env(),
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            or "{}"
        )

    def env(self):
        return {
            **os.environ,
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
        }

    def stop(self):
        self.process.kill()
        self.process.wait()


MOTO = None


def setUpModule():
    global MOTO
    for tool in (DEPLOY_VENV / "bin" / "python", MOTO_SERVER, REAL_AWS):
        if not tool.exists():
            raise RuntimeError(f"{tool} is missing: run scripts/test, which installs it")
    MOTO = Moto()


def tearDownModule():
    MOTO.stop()


class Deploy(unittest.TestCase):
    def setUp(self):
        self.dir = Path(tempfile.mkdtemp(prefix="s3spot-deploy-"))
        self.addCleanup(shutil.rmtree, self.dir)
        repo = self.dir / "repo"
        (repo / "scripts").mkdir(parents=True)
        (repo / "infra").mkdir()
        shutil.copy(ROOT / "scripts" / "deploy", repo / "scripts" / "deploy")
        shutil.copy(ROOT / "infra" / "template.yaml", repo / "infra" / "template.yaml")
        self.repo = repo
        bin_dir = self.dir / "bin"
        bin_dir.mkdir()
        for name, body in STUBS.items():
            path = bin_dir / name
            path.write_text("#!/usr/bin/env bash\nset -euo pipefail\n" + LOG + textwrap.dedent(body))
            path.chmod(0o755)
        sam = bin_dir / "sam"
        sam.write_text(f"#!{DEPLOY_VENV / 'bin' / 'python'}\n" + SAM)
        sam.chmod(0o755)
        self.state = self.dir / "state"
        self.state.mkdir()
        self.calls_file = self.dir / "calls"
        # Only the stand-ins and the basic tools: a real aws or sam on PATH is never run.
        basics = self.dir / "basics"
        basics.mkdir()
        # The running interpreter: a pyenv shim named python3 would need pyenv on PATH.
        (basics / "python3").symlink_to(sys.executable)
        for tool in ("sha256sum", "cut", "grep", "sed", "sort", "tail", "head", "printf", "awk",
                     "tr", "uniq", "mktemp", "rm", "mkdir", "chmod", "touch", "dirname", "cat",
                     "env", "bash"):
            found = shutil.which(tool)
            if found:
                (basics / tool).symlink_to(found)
        self.env = {
            "PATH": f"{bin_dir}:{basics}",
            "HOME": str(self.dir),
            "CALLS": str(self.calls_file),
            "STATE": str(self.state),
            "NEWEST_GLIBC": "GLIBC_2.28",
            "AWS_REGION": "eu-west-1",
            "REAL_AWS": str(REAL_AWS),
            "AWS_ENDPOINT_URL": MOTO.url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "SAM_CLI_TELEMETRY": "0",
        }
        vpc = MOTO.ec2("describe-vpcs", "--filters", "Name=is-default,Values=true")["Vpcs"][0]
        self.default_vpc = vpc["VpcId"]
        self.default_subnets = {
            s["AvailabilityZone"]: s["SubnetId"]
            for s in MOTO.ec2("describe-subnets", "--filters", f"Name=vpc-id,Values={self.default_vpc}",
                              "Name=default-for-az,Values=true")["Subnets"]
        }

    def deploy(self, *args, **env):
        return subprocess.run(
            [shutil.which("bash"), str(self.repo / "scripts" / "deploy"), *args],
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=120,
        )

    def calls(self):
        if not self.calls_file.exists():
            return []
        return [json.loads(line) for line in self.calls_file.read_text().splitlines()]

    def argvs(self):
        return [c["argv"] for c in self.calls()]

    def worker_sha(self):
        return hashlib.sha256((self.repo / "target/lambda/s3spot-worker/bootstrap").read_bytes()).hexdigest()

    def steps(self):
        """The calls that change something, in order."""
        out = []
        for call in self.argvs():
            args = [a for a in call if a not in ("--region", "eu-west-1")]
            if call[0] == "cargo":
                out.append("build worker")
            elif args[:3] == ["aws", "s3", "cp"]:
                out.append("upload worker")
            elif args[:3] == ["aws", "iam", "create-service-linked-role"]:
                out.append("create spot role")
            elif call[:2] == ["sam", "build"] or call[:2] == ["sam", "deploy"]:
                out.append(f"sam {call[1]}")
        return out

    def sam_deploy(self):
        (call,) = [c for c in self.calls() if c["argv"][:2] == ["sam", "deploy"]]
        return call["argv"], call["parameters"]

    def refused(self, result, message):
        self.assertNotEqual(result.returncode, 0, result.stdout)
        self.assertIn(message, result.stderr)
        self.assertEqual(self.steps(), [], "nothing may change before a refusal")

    def test_new_stack(self):
        result = self.deploy("--stack", "s3spot", "--param", "Market=on-demand")
        self.assertEqual(result.returncode, 0, result.stderr)
        # A new stack: its artifacts bucket exists only after the deploy.
        self.assertEqual(self.steps(), ["build worker", "sam build", "sam deploy", "upload worker"])
        (build,) = [c for c in self.argvs() if c[0] == "cargo"]
        self.assertEqual(build[1:3], ["lambda", "build"])
        self.assertIn("--release", build)
        self.assertEqual(build[build.index("--target") + 1], "x86_64-unknown-linux-gnu.2.34")
        sha = self.worker_sha()
        call, params = self.sam_deploy()
        # Every zone of moto's default VPC offers the types: the first zone's default subnet.
        self.assertEqual(
            params,
            {
                "PipelineName": "s3spot",
                "WorkerKey": f"workers/{sha}/s3spot-worker",
                "WorkerSha256": sha,
                "VpcId": self.default_vpc,
                "SubnetId": self.default_subnets["eu-west-1a"],
                "InstanceTypes": "m7i.large,m6i.large,m5.large",
                "ImageId": X86_IMAGE,
                "Market": "on-demand",
            },
        )
        self.assertIn("CAPABILITY_IAM", call)
        self.assertEqual(call[call.index("--region") + 1], "eu-west-1")
        (upload,) = [c for c in self.argvs() if c[1:4] == ["--region", "eu-west-1", "s3"]]
        self.assertEqual(upload[-1], f"s3://s3spot-artifacts-x/workers/{sha}/s3spot-worker")
        self.assertIn("aws s3 cp data.csv s3://s3spot-data-123456789012-eu-west-1/in/data.csv", result.stdout)
        # On demand needs no spot role: the script does not touch IAM.
        self.assertFalse([c for c in self.argvs() if "iam" in c])

    def test_existing_stack_gets_the_worker_before_the_function_does(self):
        (self.state / "stack").touch()
        (self.state / "spot-role").touch()
        subnet = self.default_subnets["eu-west-1b"]
        result = self.deploy("--vpc", self.default_vpc, "--subnet", subnet, "--guided")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(self.steps(), ["build worker", "upload worker", "sam build", "sam deploy"])
        call, params = self.sam_deploy()
        self.assertEqual((params["VpcId"], params["SubnetId"]), (self.default_vpc, subnet))
        self.assertIn("--guided", call)

    def test_a_redeploy_keeps_what_the_stack_was_deployed_with(self):
        (self.state / "stack").touch()
        subnet = self.default_subnets["eu-west-1b"]
        (self.state / "parameters").write_text(
            f"InstanceTypes\tc6i.large,m6i.large\nSubnetId\t{subnet}\nMarket\ton-demand\n"
            f"ImageId\t{X86_IMAGE}\nVpcId\t{self.default_vpc}\n"
        )
        result = self.deploy()
        self.assertEqual(result.returncode, 0, result.stderr)
        _, params = self.sam_deploy()
        self.assertEqual(params["InstanceTypes"], "c6i.large,m6i.large")
        self.assertEqual((params["SubnetId"], params["VpcId"]), (subnet, self.default_vpc))
        self.assertEqual(params["ImageId"], X86_IMAGE)
        self.assertNotIn("create spot role", self.steps(), "an on-demand stack needs no spot role")
        # Given again, a value replaces the deployed one.
        self.calls_file.unlink()
        result = self.deploy("--param", "InstanceTypes=m7i.large")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(self.sam_deploy()[1]["InstanceTypes"], "m7i.large")

    def test_parameter_values_reach_the_stack_as_typed(self):
        values = {
            "Command": 'wc -l "$S3SPOT_INPUT" > "$S3SPOT_OUTPUT_DIR/lines.txt"',
            "NotificationEmail": "",
            "SshCidr": "203.0.113.0/24",
            "KeyPairName": "it's mine, a=b $HOME \\ # not a comment \\' \\\\\" \\  end",
            "Market": '"spot"',
            "ReaperRate": "'rate(5 minutes)'",
            "MaxRuntime": "7200",
        }
        args = [a for k, v in values.items() for a in ("--param", f"{k}={v}")]
        result = self.deploy(*args)
        self.assertEqual(result.returncode, 0, result.stderr)
        _, params = self.sam_deploy()
        for key, value in values.items():
            self.assertEqual(params[key], value, key)

    def test_sam_is_never_left_waiting_for_an_answer(self):
        result = self.deploy()
        self.assertEqual(result.returncode, 0, result.stderr)
        (build,) = [c for c in self.calls() if c["argv"][:2] == ["sam", "build"]]
        self.assertEqual(build["stdin"], "/dev/null")

    def test_another_sam_cli_is_refused_before_anything_changes(self):
        for line in ("SAM CLI, version 1.94.0", "SAM CLI, version 1.171.0", "command not found"):
            with self.subTest(line=line):
                self.calls_file.unlink(missing_ok=True)
                result = self.deploy(SAM_VERSION_LINE=line)
                self.refused(result, "is not 1.170.0, the version this script builds without a prompt")

    def test_a_vpc_needs_a_subnet_of_it(self):
        vpc = MOTO.ec2("create-vpc", "--cidr-block", "10.9.0.0/16")["Vpc"]["VpcId"]
        private = MOTO.ec2("create-subnet", "--vpc-id", vpc, "--cidr-block", "10.9.1.0/24",
                           "--availability-zone", "eu-west-1b")["Subnet"]["SubnetId"]
        result = self.deploy("--vpc", vpc)
        self.refused(result, f"--vpc {vpc} needs --subnet")
        self.assertIn(private, result.stderr)

        result = self.deploy("--vpc", vpc, "--subnet", self.default_subnets["eu-west-1a"])
        self.refused(result, f"is in {self.default_vpc}, not in --vpc {vpc}")

        result = self.deploy("--subnet", "subnet-0123456789abcdef0")
        self.refused(result, "--subnet subnet-0123456789abcdef0: not found in eu-west-1")

        # The subnet alone names its VPC.
        (self.state / "spot-role").touch()
        result = self.deploy("--subnet", private)
        self.assertEqual(result.returncode, 0, result.stderr)
        _, params = self.sam_deploy()
        self.assertEqual((params["VpcId"], params["SubnetId"]), (vpc, private))

    def test_arm64_workers_get_an_arm64_image_and_graviton_types(self):
        result = self.deploy("--worker-arch", "arm64")
        self.assertEqual(result.returncode, 0, result.stderr)
        (build,) = [c for c in self.argvs() if c[0] == "cargo"]
        self.assertEqual(build[build.index("--target") + 1], "aarch64-unknown-linux-gnu.2.34")
        _, params = self.sam_deploy()
        self.assertEqual(params["ImageId"], ARM_IMAGE)
        self.assertEqual(params["InstanceTypes"], "m7g.large,m6g.large,c7g.large")

    def test_architectures_that_do_not_match_are_refused_before_anything_changes(self):
        for args, message in [
            (["--worker-arch", "arm64", "--param", "InstanceTypes=m7g.large,m7i.large"],
             "instance type m7i.large is x86_64, but the worker is built for arm64"),
            (["--param", "InstanceTypes=m7i.large,m6g.large"],
             "instance type m6g.large is arm64, but the worker is built for x86_64"),
            (["--param", f"ImageId={ARM_IMAGE}"], "an arm64 image, but the worker is built for x86_64"),
            (["--worker-arch", "arm64", "--param", f"ImageId={X86_IMAGE}"],
             "an x86_64 image, but the worker is built for arm64"),
            (["--param", "InstanceTypes=m7i.large,m9z.large"], "m9z.large"),
            (["--param", "InstanceTypes=m7i.large m6i.large"], "must be a comma list of instance types"),
            (["--param", "ImageId=/no/such/parameter"], "ImageId /no/such/parameter: cannot read this SSM parameter"),
        ]:
            with self.subTest(args=args):
                self.calls_file.unlink(missing_ok=True)
                self.refused(self.deploy(*args), message)

    def test_the_spot_role_is_created_once(self):
        result = self.deploy()
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(self.steps()[:2], ["build worker", "create spot role"])
        self.assertTrue((self.state / "spot-role").exists())

        # It exists now: the next deploy leaves it alone.
        self.calls_file.unlink()
        result = self.deploy()
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertNotIn("create spot role", self.steps())

    def test_a_spot_role_created_meanwhile_is_no_error(self):
        result = self.deploy(CREATED_MEANWHILE="1")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("sam deploy", self.steps())

    def test_a_spot_role_that_cannot_be_created_stops_the_deploy_and_says_who_can(self):
        result = self.deploy(CREATE_FAILS="1")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("cannot create the spot service-linked role AWSServiceRoleForEC2Spot", result.stderr)
        self.assertIn("aws iam create-service-linked-role --aws-service-name spot.amazonaws.com", result.stderr)
        self.assertEqual(self.steps(), ["build worker", "create spot role"])

        self.calls_file.unlink()
        result = self.deploy(IAM_FAILS="AccessDenied")
        self.assertIn("cannot tell whether the spot service-linked role AWSServiceRoleForEC2Spot exists", result.stderr)
        self.assertEqual(self.steps(), ["build worker"])

    def test_a_worker_that_needs_a_newer_glibc_is_never_deployed(self):
        result = self.deploy(NEWEST_GLIBC="GLIBC_2.38")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("needs glibc 2.38, newer than Amazon Linux 2023's 2.34", result.stderr)
        self.assertEqual(self.steps(), ["build worker"])

    def test_bad_input_is_refused_before_anything_runs(self):
        for args, message in [
            (["--stack", "My_Stack"], "stack name 'My_Stack' must be 1 to 24 lowercase"),
            (["--worker-arch", "sparc"], "--worker-arch 'sparc' is not x86_64 or arm64"),
            (["--param", "oops"], "--param needs KEY=VALUE, got 'oops'"),
            (["--param", "VpcId=vpc-1"], "--param VpcId: use --vpc"),
            (["--param", "SubnetId=subnet-1"], "--param SubnetId: use --subnet"),
            (["--param", "WorkerSha256=abc"], "the script sets it"),
            (["--param", "Command=a\nb"], "--param Command: the value has a line break"),
            (["--param", "Market=spot", "--param", "Market=on-demand"], "--param Market is given twice"),
            (["--vpc", "default"], "--vpc 'default' is not a VPC id"),
            (["--frobnicate"], "unknown argument '--frobnicate'"),
        ]:
            with self.subTest(args=args):
                result = self.deploy(*args)
                self.assertNotEqual(result.returncode, 0)
                self.assertIn(message, result.stderr)
        self.assertEqual(self.calls(), [])

    def test_no_region(self):
        env = dict(self.env)
        del env["AWS_REGION"]
        self.env = env
        result = self.deploy()
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("no region: pass --region or set AWS_REGION", result.stderr)

    def test_missing_tool_says_how_to_install_it(self):
        (self.dir / "bin" / "sam").unlink()
        result = self.deploy()
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("'sam' is not on PATH", result.stderr)
        self.assertIn("infra/requirements-deploy.txt", result.stderr)
        self.assertEqual(self.calls(), [])


class Bash32(unittest.TestCase):
    """macOS's /bin/bash is 3.2, and no bash that old can be installed here, so the script is
    held to the subset of bash that 3.2 runs. Under `set -u`, bash before 4.4 calls an empty
    "${a[@]}" (and ${#a[@]} in some versions) unbound."""

    BASH4_ONLY = {
        r"\bdeclare\s+-[a-zA-Z]*[An]": "associative arrays and namerefs (bash 4)",
        r"\blocal\s+-[a-zA-Z]*[An]": "associative arrays and namerefs (bash 4)",
        r"\b(mapfile|readarray|coproc)\b": "bash 4 builtins",
        r"\$\{[A-Za-z_][A-Za-z_0-9]*(\[[^]]*\])?(,,?|\^\^?)": "case conversion (bash 4)",
        r"&>>|\|&|;;&|;&": "bash 4 redirections and case fall-through",
        r"\[-[0-9]+\]": "negative subscripts (bash 4.3)",
        r"\$\{#[A-Za-z_][A-Za-z_0-9]*\[[@*]\]\}": "array length of a possibly empty array",
        r"\bwait\s+-n\b": "wait -n (bash 4.3)",
    }

    def check(self, text):
        problems = []
        code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
        for pattern, what in self.BASH4_ONLY.items():
            for match in re.finditer(pattern, code):
                problems.append(f"{match.group(0)!r}: {what}")
        # Every "${a[@]}" must be guarded as ${a[@]+"${a[@]}"}.
        for match in re.finditer(r'"\$\{([A-Za-z_][A-Za-z_0-9]*)\[@\]\}"', code):
            name = match.group(1)
            guard = "${" + name + '[@]+"${' + name + '[@]}"}'
            start = match.start() - len("${" + name + "[@]+")
            if code[start : start + len(guard)] != guard:
                problems.append(f'"${{{name}[@]}}" unguarded: write {guard}')
        return problems

    def test_the_deploy_script_uses_only_what_bash_3_2_runs(self):
        self.assertEqual(self.check((ROOT / "scripts" / "deploy").read_text()), [])

    def test_the_check_finds_what_bash_3_2_rejects(self):
        for snippet in [
            'sam deploy "${guided[@]}"',
            "declare -A seen",
            'echo "${name,,}"',
            "mapfile -t lines < f",
            'n=${#extra[@]}',
        ]:
            with self.subTest(snippet=snippet):
                self.assertNotEqual(self.check(snippet), [])
        self.assertEqual(self.check('sam deploy ${guided[@]+"${guided[@]}"}'), [])


class SamBuild(unittest.TestCase):
    """The pinned SAM CLI builds the function with no terminal: stdin closed, no prompt. cargo
    is a stand-in that writes the binary where cargo-lambda would."""

    def test_sam_build_runs_unattended(self):
        work = Path(tempfile.mkdtemp(prefix="s3spot-sam-build-"))
        self.addCleanup(shutil.rmtree, work)
        repo = work / "repo"
        (repo / "infra").mkdir(parents=True)
        shutil.copy(ROOT / "infra" / "template.yaml", repo / "infra" / "template.yaml")
        bin_dir = work / "bin"
        bin_dir.mkdir()
        calls = work / "calls"
        cargo = bin_dir / "cargo"
        cargo.write_text(textwrap.dedent(f"""\
            #!/usr/bin/env bash
            echo "$*" >> {calls}
            case "$1 $2" in
              "lambda build") mkdir -p target/lambda/s3spot-lambda && echo binary > target/lambda/s3spot-lambda/bootstrap ;;
              "lambda --version"|"lambda -V") echo "cargo-lambda 1.9.2" ;;
              *) exit 1 ;;
            esac
            """))
        cargo.chmod(0o755)
        shutil.copy(cargo, bin_dir / "cargo-lambda")
        result = subprocess.run(
            [str(DEPLOY_VENV / "bin" / "sam"), "build", "--template-file", "infra/template.yaml",
             "--build-dir", str(work / "build")],
            cwd=repo,
            stdin=subprocess.DEVNULL,
            env={"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(work), "SAM_CLI_TELEMETRY": "0",
                 "LANG": "C.UTF-8"},
            capture_output=True,
            text=True,
            timeout=300,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertNotIn("[y/N]", result.stdout + result.stderr)
        self.assertIn("lambda build --release --bin s3spot-lambda", calls.read_text())
        self.assertEqual((work / "build" / "LauncherFunction" / "bootstrap").read_text(), "binary\n")


if __name__ == "__main__":
    unittest.main()
