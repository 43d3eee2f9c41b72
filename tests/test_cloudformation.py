"""deploy/cloudformation.yaml: cfn-lint passes, and what the template promises holds.

The key policy is resolved with sample parameters (with and without PCR8) and evaluated by the
same promises scripts/render_key_policy.py checks on key_policy.json; the roles, the launch
template, the security group and the alarm rules are checked for what matters.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from protocol.key_policy import evaluate

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "deploy" / "cloudformation.yaml"
ACCOUNT = "111122223333"
PARTITION = "aws"
REGION = "us-east-1"
ADMIN = f"arn:aws:iam::{ACCOUNT}:role/key-admin"
PCRS = {0: "a0" * 48, 1: "b1" * 48, 2: "c2" * 48, 8: "d8" * 48}


# ---- reading the template ------------------------------------------------------------------------


class _CfnLoader(yaml.SafeLoader):
    """YAML with CloudFormation's short tags read as their long forms (`!Ref X` -> {"Ref": X})."""


def _short_form(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    if isinstance(node, yaml.ScalarNode):
        value: Any = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    if suffix == "Ref":
        return {"Ref": value}
    if suffix == "GetAtt" and isinstance(value, str):
        value = value.split(".", 1)
    return {f"Fn::{suffix}": value}


_CfnLoader.add_multi_constructor("!", _short_form)


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return yaml.load(TEMPLATE.read_text(), Loader=_CfnLoader)  # noqa: S506 - SafeLoader subclass


def resources(template: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {name: r for name, r in template["Resources"].items() if r["Type"] == kind}


class Resolver:
    """Just enough of CloudFormation's intrinsic functions to read the policies the template
    builds: Ref, GetAtt (made-up ARNs), If, Sub, Join, Equals, Not and AWS::NoValue."""

    NO_VALUE = object()

    def __init__(self, template: dict[str, Any], parameters: dict[str, Any]) -> None:
        self.template = template
        self.values = {
            name: spec.get("Default", "") for name, spec in template["Parameters"].items()
        }
        self.values.update(parameters)
        self.values.update(
            {
                "AWS::AccountId": ACCOUNT,
                "AWS::Partition": PARTITION,
                "AWS::Region": REGION,
                "AWS::StackName": "llm",
            }
        )

    def arn_of(self, resource: str) -> str:
        kind = self.template["Resources"][resource]["Type"]
        if kind == "AWS::IAM::Role":
            return f"arn:aws:iam::{ACCOUNT}:role/llm-{resource}"
        if kind == "AWS::KMS::Key":
            return f"arn:aws:kms:{REGION}:{ACCOUNT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
        return f"arn:aws:made-up:{REGION}:{ACCOUNT}:{resource}"

    def condition(self, name: str) -> bool:
        return bool(self.resolve(self.template["Conditions"][name]))

    def resolve(self, value: Any) -> Any:
        if isinstance(value, list):
            items = [self.resolve(item) for item in value]
            return [item for item in items if item is not self.NO_VALUE]
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            [(key, arg)] = value.items()
            if key == "Ref":
                if arg == "AWS::NoValue":
                    return self.NO_VALUE
                if arg in self.values:
                    return self.values[arg]
                return f"{arg}-id"
            if key == "Fn::GetAtt":
                assert arg[1] == "Arn", arg
                return self.arn_of(arg[0])
            if key == "Fn::If":
                name, yes, no = arg
                return self.resolve(yes if self.condition(name) else no)
            if key == "Fn::Equals":
                left, right = (self.resolve(item) for item in arg)
                return left == right
            if key == "Fn::Not":
                return not self.resolve(arg[0])
            if key == "Fn::Join":
                return arg[0].join(str(item) for item in self.resolve(arg[1]))
            if key == "Fn::Sub":
                text = arg
                for name, val in self.values.items():
                    text = text.replace("${" + name + "}", str(val))
                return text
            if key == "Condition":
                return self.condition(arg)
        resolved = {k: self.resolve(v) for k, v in value.items()}
        return {k: v for k, v in resolved.items() if v is not self.NO_VALUE}


def parameters(pcr8: bool) -> dict[str, Any]:
    return {
        "Pcr0": PCRS[0],
        "Pcr1": PCRS[1],
        "Pcr2": PCRS[2],
        "Pcr8": PCRS[8] if pcr8 else "",
        "AdminRoleArn": ADMIN,
        "ClientCidr": "203.0.113.0/24",
        "VpcId": "vpc-1",
    }


def load_renderer() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "render_key_policy_for_cfn", ROOT / "scripts" / "render_key_policy.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# ---- the tests ---------------------------------------------------------------------------------


def test_cfn_lint_passes() -> None:
    lint = Path(sys.executable).parent / "cfn-lint"
    done = subprocess.run(  # noqa: S603 - our own venv's tool, fixed arguments
        [str(lint), str(TEMPLATE)], capture_output=True, text=True, timeout=180, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("pcr8", [False, True], ids=["unsigned", "signed"])
def test_the_key_policy_keeps_the_renderers_promises(template, pcr8: bool) -> None:
    resolver = Resolver(template, parameters(pcr8))
    policy = resolver.resolve(template["Resources"]["Key"]["Properties"]["KeyPolicy"])
    renderer = load_renderer()
    pinned = {n: v for n, v in PCRS.items() if pcr8 or n != 8}
    principals = renderer.Principals(
        account_id=ACCOUNT,
        user_arns=(resolver.arn_of("ClientRole"),),
        parent_role_arn=resolver.arn_of("ParentRole"),
        admin_arns=(ADMIN,),
    )
    # Raises, naming the broken promise, if any statement is weaker than key_policy.json's.
    renderer.check_promises(policy, pinned, principals)
    keys = {
        key
        for statement in policy["Statement"]
        for operator in statement.get("Condition", {}).values()
        for key in operator
    }
    assert {f"kms:RecipientAttestation:PCR{n}" for n in pinned} <= keys
    assert ("kms:RecipientAttestation:PCR8" in keys) == pcr8
    assert "kms:RecipientAttestation:PCR4" not in keys  # per instance: never pinned
    # The same image on another instance (another PCR4) is admitted: one policy, many parents.
    attested = {f"kms:RecipientAttestation:PCR{n}": v for n, v in pinned.items()}
    for pcr4 in ("11" * 48, "22" * 48):
        decision = evaluate(
            policy,
            principal_arn=principals.parent_role_arn,
            action="kms:Decrypt",
            context={**attested, "kms:RecipientAttestation:PCR4": pcr4},
        )
        assert decision.allowed, decision.reason


def test_the_parent_role_never_decrypts_without_attestation(template) -> None:
    resolver = Resolver(template, parameters(pcr8=False))
    role = template["Resources"]["ParentRole"]["Properties"]
    assert "Policies" not in role  # its only key permission is the policy checked below
    assert [resolver.resolve(arn) for arn in role["ManagedPolicyArns"]] == [
        "arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore"
    ]
    for name, policy in resources(template, "AWS::IAM::RolePolicy").items():
        document = resolver.resolve(policy["Properties"]["PolicyDocument"])
        for statement in document["Statement"]:
            actions = statement["Action"]
            actions = [actions] if isinstance(actions, str) else actions
            assert not any(a == "*" or a.startswith("kms:*") for a in actions), name
            assert statement["Resource"] != "*", name
    parent = resolver.resolve(
        template["Resources"]["ParentKeyPolicy"]["Properties"]["PolicyDocument"]
    )
    key_arn = resolver.arn_of("Key")
    parent_arn = resolver.arn_of("ParentRole")
    # An identity policy names no principal: evaluated as the role it is attached to.
    for statement in parent["Statement"]:
        statement["Principal"] = {"AWS": parent_arn}
    attested = {f"kms:RecipientAttestation:PCR{n}": PCRS[n] for n in (0, 1, 2)}

    def decides(context: dict[str, str]) -> bool:
        return evaluate(
            parent,
            principal_arn=parent_arn,
            action="kms:Decrypt",
            context=context,
            resource=key_arn,
        ).allowed

    assert decides(attested)
    assert not decides({})
    assert not decides({**attested, "kms:RecipientAttestation:PCR0": "f" * 96})
    for action in ("kms:Encrypt", "kms:GenerateDataKey", "kms:CreateGrant", "kms:PutKeyPolicy"):
        assert not evaluate(
            parent, principal_arn=parent_arn, action=action, context=attested, resource=key_arn
        ).allowed


def test_the_launch_template_enables_enclaves_and_requires_imdsv2(template) -> None:
    [data] = [
        r["Properties"]["LaunchTemplateData"]
        for r in resources(template, "AWS::EC2::LaunchTemplate").values()
    ]
    assert data["EnclaveOptions"] == {"Enabled": True}
    assert data["MetadataOptions"]["HttpTokens"] == "required"
    assert data["MetadataOptions"]["HttpPutResponseHopLimit"] == 1
    assert all(m["Ebs"]["Encrypted"] is True for m in data["BlockDeviceMappings"])


def test_only_https_reaches_the_parent(template) -> None:
    group = template["Resources"]["ParentSecurityGroup"]["Properties"]
    ingress = group["SecurityGroupIngress"] + [
        r["Properties"] for r in resources(template, "AWS::EC2::SecurityGroupIngress").values()
    ]
    assert {(rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) for rule in ingress} == {
        ("tcp", 443, 443)
    }
    assert group["SecurityGroupIngress"][0]["CidrIp"] == {"Ref": "ClientCidr"}
    assert [(r["FromPort"], r["ToPort"]) for r in group["SecurityGroupEgress"]] == [(443, 443)]


def test_alarms_watch_policy_changes_grants_and_unattested_decrypts(template) -> None:
    rules = {name: r["Properties"] for name, r in resources(template, "AWS::Events::Rule").items()}
    topic = {"Ref": "AlarmTopic"}
    by_event: dict[str, dict[str, Any]] = {}
    for rule in rules.values():
        assert rule["Targets"][0]["Arn"] == topic
        pattern = rule["EventPattern"]
        assert pattern["detail-type"] == ["AWS API Call via CloudTrail"]
        assert pattern["detail"]["eventSource"] == ["kms.amazonaws.com"]
        # Only this key's events: by its id or ARN in the request, or in the resources.
        keys = pattern["detail"]["$or"]
        assert {"Ref": "Key"} in keys[0]["requestParameters"]["keyId"]
        assert keys[1]["resources"]["ARN"] == [{"Fn::GetAtt": ["Key", "Arn"]}]
        for name in pattern["detail"]["eventName"]:
            by_event[name] = rule
    assert set(by_event) == {"PutKeyPolicy", "CreateGrant", "Decrypt"}
    decrypt = by_event["Decrypt"]
    # CloudTrail puts an attested request's document details under additionalEventData.
    recipient = decrypt["EventPattern"]["detail"]["additionalEventData"]["recipient"]
    assert recipient == {"attestationDocumentModuleId": [{"exists": False}]}
    assert decrypt["State"] == "ENABLED_WITH_ALL_CLOUDTRAIL_MANAGEMENT_EVENTS"
    [trail] = [r["Properties"] for r in resources(template, "AWS::CloudTrail::Trail").values()]
    assert trail["IsLogging"] is True
    assert trail["EventSelectors"][0]["ReadWriteType"] == "All"


def test_scale_out_passes_tls_through_and_checks_readiness(template) -> None:
    listener = template["Resources"]["ProxyListener"]["Properties"]
    assert (listener["Protocol"], listener["Port"]) == ("TCP", 443)
    group = template["Resources"]["ProxyTargetGroup"]["Properties"]
    assert (group["Protocol"], group["Port"]) == ("TCP", 443)
    assert (group["HealthCheckProtocol"], group["HealthCheckPath"]) == ("HTTPS", "/readyz")
    asg = template["Resources"]["ParentGroup"]["Properties"]
    assert asg["LaunchTemplate"]["LaunchTemplateId"] == {"Ref": "ParentLaunchTemplate"}
    assert asg["HealthCheckType"] == "ELB"


def test_parameters_refuse_a_debug_mode_pcr0_and_default_to_no_enclave(template) -> None:
    params = template["Parameters"]
    pcr0 = re.compile(params["Pcr0"]["AllowedPattern"])
    assert pcr0.match(PCRS[0]) and not pcr0.match("0" * 96) and not pcr0.match("ab")
    # Before the image exists the key releases nothing: the defaults are no real measurement.
    defaults = {n: params[f"Pcr{n}"]["Default"] for n in (0, 1, 2)}
    assert set(defaults.values()) == {"f" * 96}
    assert re.compile(params["Pcr8"]["AllowedPattern"]).match("")


# ---- rules: what the stack refuses before creating anything -------------------------------------


def rule_value(value: Any, params: dict[str, Any]) -> Any:
    """CloudFormation's rule functions used by the template: Ref (a CommaDelimitedList as its
    list), Equals, Not, And, Or, EachMemberEquals."""
    if isinstance(value, dict) and len(value) == 1:
        [(key, arg)] = value.items()
        if key == "Ref":
            return params[arg]
        if key == "Fn::Equals":
            left, right = (rule_value(item, params) for item in arg)
            return left == right
        if key == "Fn::Not":
            return not rule_value(arg[0], params)
        if key == "Fn::And":
            return all(rule_value(item, params) for item in arg)
        if key == "Fn::Or":
            return any(rule_value(item, params) for item in arg)
        if key == "Fn::EachMemberEquals":
            members, expected = rule_value(arg[0], params), rule_value(arg[1], params)
            assert isinstance(members, list), members
            return all(member == expected for member in members)
        raise AssertionError(f"not a rule function: {key}")
    return value


def refused_by_rules(template: dict[str, Any], **given: Any) -> list[str]:
    """The assertion messages the stack's rules would fail with for these parameters (defaults
    otherwise; a CommaDelimitedList parameter's value is its list)."""
    params = {}
    for name, spec in template["Parameters"].items():
        value = given.get(name, spec.get("Default", ""))
        if spec["Type"] == "CommaDelimitedList" and isinstance(value, str):
            value = value.split(",")
        params[name] = value
    failed = []
    for rule in template["Rules"].values():
        if not rule_value(rule.get("RuleCondition", True), params):
            continue
        failed += [
            " ".join(a["AssertDescription"].split())
            for a in rule["Assertions"]
            if not rule_value(a["Assert"], params)
        ]
    return failed


def test_scale_out_is_refused_without_health_check_access_or_a_baked_image(template) -> None:
    subnets = ["subnet-a", "subnet-b"]
    ami = "ami-0123456789abcdef0"
    # No scale-out (the default, SubnetIds empty): nothing more is needed.
    assert refused_by_rules(template) == []
    assert refused_by_rules(template, SubnetIds="") == []
    # Scale-out with the load balancer's CIDR and a baked image: accepted.
    assert (
        refused_by_rules(template, SubnetIds=subnets, LoadBalancerCidr="10.0.0.0/16", ImageId=ami)
        == []
    )
    # Without the CIDR, the health checks could never pass the security group.
    [message] = refused_by_rules(template, SubnetIds=subnets, ImageId=ami)
    assert "LoadBalancerCidr" in message
    # Without the image, a parent would never start the services.
    [message] = refused_by_rules(template, SubnetIds=subnets, LoadBalancerCidr="10.0.0.0/16")
    assert "ImageId" in message and "docs/scaling.md" in message
    assert len(refused_by_rules(template, SubnetIds=subnets)) == 2
    # The condition the resources use agrees with the rule's on what "scale-out" means.
    for value, scale_out in (([""], False), (subnets, True)):
        resolver = Resolver(template, {**parameters(False), "SubnetIds": value})
        assert resolver.condition("ScaleOut") is scale_out


def test_the_launch_template_uses_the_baked_image_that_starts_the_services(template) -> None:
    data = template["Resources"]["ParentLaunchTemplate"]["Properties"]["LaunchTemplateData"]
    assert data["ImageId"] == {
        "Fn::If": ["HasImageId", {"Ref": "ImageId"}, {"Ref": "AWS::NoValue"}]
    }
    image = template["Parameters"]["ImageId"]
    assert image["Type"] == "String" and "docs/scaling.md" in image["Description"]
    pattern = re.compile(image["AllowedPattern"])
    assert pattern.fullmatch("ami-0123456789abcdef0") and pattern.fullmatch("")
    assert not pattern.fullmatch("/aws/service/ami-amazon-linux-latest/al2023")  # not a stock one
    script = data["UserData"]["Fn::Base64"]
    for unit in (
        "nitro-enclaves-allocator",
        "nitro-vsock-proxy",
        "nitro-llm-enclave",
        "nitro-llm-proxy",
    ):
        assert f"{unit}.service" in script
        assert (ROOT / "deploy" / "systemd" / f"{unit}.service").exists() or unit.startswith(
            "nitro-enclaves"  # the allocator's unit comes with the aws-nitro-enclaves-cli package
        )
    assert "enable --now" in script
