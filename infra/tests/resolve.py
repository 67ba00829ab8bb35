"""Prints the launcher function's environment as a deployed stack would give it: the template's
intrinsics resolved with the parameters' defaults, the given parameter values, and the given
physical ids. tests/tests/infra.rs feeds the result to the real launcher configuration, so that
a value the launcher would refuse at start-up fails a test instead of a deploy. With --policy,
it prints policies resolved too, for the IAM-evaluating doubles of cli/tests/permissions.rs.

    python -m infra.tests.resolve --param WorkerSha256=... --physical WorkerLaunchTemplate=lt-1 ...
"""

import argparse
import json
import sys

from infra.tests.template import transformed

PSEUDO = {
    "AWS::Region": "us-east-1",
    "AWS::AccountId": "123456789012",
    "AWS::Partition": "aws",
    "AWS::StackName": "s3spot",
    "AWS::URLSuffix": "amazonaws.com",
}
NO_VALUE = object()


class Unresolved(Exception):
    pass


class Resolver:
    def __init__(self, template, params, physical):
        self.template = template
        self.params = {}
        for name, spec in template.get("Parameters", {}).items():
            if name in params:
                value = params[name]
            elif "Default" in spec:
                value = spec["Default"]
            else:
                raise Unresolved(f"parameter {name} has no default; pass --param {name}=...")
            if spec["Type"] == "CommaDelimitedList" and isinstance(value, str):
                value = [item.strip() for item in value.split(",")]
            self.params[name] = value if isinstance(value, list) else str(value)
        self.physical = physical

    def ref(self, name):
        if name == "AWS::NoValue":
            return NO_VALUE
        if name in PSEUDO:
            return PSEUDO[name]
        if name in self.params:
            return self.params[name]
        if name in self.physical:
            return self.physical[name]
        raise Unresolved(f"no physical id for {name}; pass --physical {name}=...")

    def get_att(self, name, attribute):
        key = f"{name}.{attribute}"
        if key in self.physical:
            return self.physical[key]
        raise Unresolved(f"no value for {key}; pass --physical {key}=...")

    def condition(self, name):
        return self.resolve(self.template["Conditions"][name])

    def sub(self, text, variables=None):
        out = []
        rest = text
        while "${" in rest:
            before, _, after = rest.partition("${")
            name, _, rest = after.partition("}")
            out.append(before)
            if variables and name in variables:
                value = self.resolve(variables[name])
            elif "." in name and not name.startswith("AWS::"):
                value = self.get_att(*name.split(".", 1))
            else:
                value = self.ref(name)
            out.append(value if isinstance(value, str) else ",".join(value))
        out.append(rest)
        return "".join(out)

    def resolve(self, value):
        if isinstance(value, list):
            return [v for v in (self.resolve(item) for item in value) if v is not NO_VALUE]
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            (function, arg), = value.items()
            if function == "Ref":
                return self.ref(arg)
            if function == "Fn::GetAtt":
                return self.get_att(*arg)
            if function == "Fn::Sub":
                return self.sub(arg) if isinstance(arg, str) else self.sub(arg[0], arg[1])
            if function == "Fn::Join":
                return arg[0].join(self.resolve(arg[1]))
            if function == "Fn::Select":
                return self.resolve(arg[1])[int(self.resolve(arg[0]))]
            if function == "Fn::If":
                chosen = arg[1] if self.condition(arg[0]) else arg[2]
                return self.resolve(chosen)
            if function == "Fn::Equals":
                left, right = (self.resolve(v) for v in arg)
                return str(left) == str(right)
            if function == "Fn::Not":
                return not self.resolve(arg[0])
            if function == "Fn::And":
                return all(self.resolve(v) for v in arg)
            if function == "Condition":
                return self.condition(arg)
        resolved = {k: self.resolve(v) for k, v in value.items()}
        return {k: v for k, v in resolved.items() if v is not NO_VALUE}


def pairs(items):
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"expected NAME=VALUE, got {item!r}")
        out[name] = value
    return out


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--param", action="append", default=[], help="NAME=VALUE")
    parser.add_argument("--physical", action="append", default=[], help="Resource[.Attr]=VALUE")
    parser.add_argument(
        "--policy",
        action="append",
        default=[],
        help="also print this policy, resolved: Role/PolicyName, or a managed policy's name",
    )
    args = parser.parse_args(argv)
    template = transformed()
    try:
        resolver = Resolver(template, pairs(args.param), pairs(args.physical))
        function = template["Resources"]["LauncherFunction"]["Properties"]
        environment = resolver.resolve(function["Environment"]["Variables"])
        policies = {name: resolver.resolve(policy(template, name)) for name in args.policy}
    except Unresolved as error:
        raise SystemExit(f"resolve: {error}")
    json.dump({"environment": environment, "policies": policies}, sys.stdout, indent=2, sort_keys=True)
    print()


def policy(template, name):
    """The policy document `name` names: a role's inline policy as Role/PolicyName, or a
    managed policy's logical id."""
    resource, _, inline = name.partition("/")
    props = template["Resources"][resource]["Properties"]
    if not inline:
        return props["PolicyDocument"]
    (document,) = [p["PolicyDocument"] for p in props["Policies"] if p["PolicyName"] == inline]
    return document


if __name__ == "__main__":
    main(sys.argv[1:])
