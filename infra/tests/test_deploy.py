"""scripts/deploy, run for real against stand-ins for cargo-lambda, objdump, the AWS CLI and the
SAM CLI that record every call. What is checked is the order of the steps and what each one is
given: the worker's sha256 and key reach the stack, and the binary is in S3 before any function
can point at it."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import unittest
from pathlib import Path

from infra.tests.template import ROOT

# Each stand-in appends its arguments, one JSON array per line, to $CALLS.
STUBS = {
    "cargo": r"""
        log cargo "$@"
        mkdir -p target/lambda/s3spot-worker
        printf 'worker binary for %s\n' "$*" > target/lambda/s3spot-worker/bootstrap
        chmod +x target/lambda/s3spot-worker/bootstrap
    """,
    "cargo-lambda": "log cargo-lambda \"$@\"",
    "objdump": "echo \"0000 DF *UND* 0000 (GLIBC_2.2.5) memcpy\"; echo \"0000 DF *UND* 0000 (${NEWEST_GLIBC}) pthread_create\"",
    "aws": r"""
        log aws "$@"
        case "$1 $2" in
          "cloudformation describe-stacks")
            [[ -e $STATE/stack ]] || { echo "Stack with id s3spot does not exist" >&2; exit 255; }
            case "$*" in
              *ArtifactsBucketName*) echo s3spot-artifacts-x ;;
              *DataBucketName*) echo s3spot-data-123456789012-eu-west-1 ;;
              *LauncherLogGroupName*) echo /aws/lambda/s3spot-launcher ;;
              *) echo '{"Stacks": []}' ;;
            esac ;;
          "ec2 describe-vpcs") echo vpc-0123456789abcdef0 ;;
          "s3 cp") ;;
          *) echo "unexpected aws call: $*" >&2; exit 2 ;;
        esac
    """,
    "sam": r"""
        log sam "$@"
        [[ $1 == deploy ]] && touch "$STATE/stack"
        exit 0
    """,
}

LOG = r"""
log() {
  python3 -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@" >> "$CALLS"
}
"""


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
        self.state = self.dir / "state"
        self.state.mkdir()
        self.calls_file = self.dir / "calls"
        # Only the stand-ins and the basic tools: a real aws or sam on this machine is never run.
        basics = self.dir / "basics"
        basics.mkdir()
        # The running interpreter: a pyenv shim named python3 would need pyenv on PATH.
        (basics / "python3").symlink_to(sys.executable)
        for tool in ("sha256sum", "cut", "grep", "sed", "sort", "tail", "printf",
                     "mkdir", "chmod", "touch", "dirname", "cat", "env", "bash"):
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
        }

    def deploy(self, *args, **env):
        return subprocess.run(
            [shutil.which("bash"), str(self.repo / "scripts" / "deploy"), *args],
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )

    def calls(self):
        if not self.calls_file.exists():
            return []
        return [json.loads(line) for line in self.calls_file.read_text().splitlines()]

    def worker_sha(self):
        return hashlib.sha256((self.repo / "target/lambda/s3spot-worker/bootstrap").read_bytes()).hexdigest()

    def steps(self):
        """The calls that change something, in order."""
        out = []
        for call in self.calls():
            if call[0] == "cargo":
                out.append("build worker")
            elif call[:3] == ["aws", "s3", "cp"]:
                out.append("upload worker")
            elif call[0] == "sam":
                out.append(f"sam {call[1]}")
        return out

    def sam_deploy(self):
        (call,) = [c for c in self.calls() if c[:2] == ["sam", "deploy"]]
        at = call.index("--parameter-overrides")
        return call, dict(p.split("=", 1) for p in call[at + 1 :])

    def test_new_stack(self):
        result = self.deploy("--stack", "s3spot", "--param", "Market=on-demand")
        self.assertEqual(result.returncode, 0, result.stderr)
        # A new stack: its artifacts bucket exists only after the deploy.
        self.assertEqual(self.steps(), ["build worker", "sam build", "sam deploy", "upload worker"])
        (build,) = [c for c in self.calls() if c[0] == "cargo"]
        self.assertEqual(build[1:3], ["lambda", "build"])
        self.assertIn("--release", build)
        self.assertEqual(build[build.index("--target") + 1], "x86_64-unknown-linux-gnu.2.34")
        sha = self.worker_sha()
        call, params = self.sam_deploy()
        self.assertEqual(
            params,
            {
                "PipelineName": "s3spot",
                "WorkerKey": f"workers/{sha}/s3spot-worker",
                "WorkerSha256": sha,
                "VpcId": "vpc-0123456789abcdef0",
                "Market": "on-demand",
            },
        )
        self.assertIn("CAPABILITY_IAM", call)
        self.assertEqual(call[call.index("--region") + 1], "eu-west-1")
        (upload,) = [c for c in self.calls() if c[:3] == ["aws", "s3", "cp"]]
        self.assertEqual(upload[-1], f"s3://s3spot-artifacts-x/workers/{sha}/s3spot-worker")
        self.assertIn("aws s3 cp data.csv s3://s3spot-data-123456789012-eu-west-1/in/data.csv", result.stdout)

    def test_existing_stack_gets_the_worker_before_the_function_does(self):
        (self.state / "stack").touch()
        result = self.deploy("--vpc", "vpc-0fedcba9876543210", "--guided")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(self.steps(), ["build worker", "upload worker", "sam build", "sam deploy"])
        call, params = self.sam_deploy()
        self.assertEqual(params["VpcId"], "vpc-0fedcba9876543210")
        self.assertIn("--guided", call)
        self.assertFalse(any(c[:3] == ["aws", "ec2", "describe-vpcs"] for c in self.calls()))

    def test_a_worker_that_needs_a_newer_glibc_is_never_deployed(self):
        result = self.deploy(NEWEST_GLIBC="GLIBC_2.38")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("needs glibc 2.38, newer than Amazon Linux 2023's 2.34", result.stderr)
        self.assertEqual(self.steps(), ["build worker"])

    def test_arm64_workers(self):
        result = self.deploy("--worker-arch", "arm64")
        self.assertEqual(result.returncode, 0, result.stderr)
        (build,) = [c for c in self.calls() if c[0] == "cargo"]
        self.assertEqual(build[build.index("--target") + 1], "aarch64-unknown-linux-gnu.2.34")

    def test_bad_input_is_refused_before_anything_runs(self):
        for args, message in [
            (["--stack", "My_Stack"], "stack name 'My_Stack' must be 1 to 24 lowercase"),
            (["--worker-arch", "sparc"], "--worker-arch 'sparc' is not x86_64 or arm64"),
            (["--param", "oops"], "--param needs KEY=VALUE, got 'oops'"),
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


if __name__ == "__main__":
    unittest.main()
