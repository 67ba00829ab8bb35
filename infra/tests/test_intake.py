"""The deployed intake, run on moto: the data bucket sends its object events to EventBridge, the
template's uploads rule (its EventPattern exactly as the template has it) sends them to the
intake queue, and what the jobs write under the results prefix never gets there. Each message
that does arrive costs a function invocation, and the queue's few concurrent pollers are for
uploads."""

import json
import unittest

import boto3
from moto import mock_aws

from infra.tests.template import transformed

REGION = "eu-west-1"
BUCKET = "s3spot-data-123456789012-eu-west-1"


def uploads_pattern(template):
    """The rule's pattern, resolved as a stack named s3spot in 123456789012/eu-west-1 has it."""
    pattern = template["Resources"]["UploadsRule"]["Properties"]["EventPattern"]
    (name,) = pattern["detail"]["bucket"]["name"]
    resolved = (
        name["Fn::Sub"]
        .replace("${PipelineName}", "s3spot")
        .replace("${AWS::AccountId}", "123456789012")
        .replace("${AWS::Region}", REGION)
    )
    assert resolved == BUCKET, resolved
    text = json.dumps(pattern)
    return text.replace(json.dumps(name), json.dumps(BUCKET))


class Intake(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.template = transformed()

    @mock_aws
    def test_only_uploads_reach_the_queue(self):
        s3 = boto3.client("s3", region_name=REGION)
        sqs = boto3.client("sqs", region_name=REGION)
        events = boto3.client("events", region_name=REGION)
        s3.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})
        notifications = self.template["Resources"]["DataBucket"]["Properties"]["NotificationConfiguration"]
        self.assertEqual(notifications, {"EventBridgeConfiguration": {"EventBridgeEnabled": True}})
        s3.put_bucket_notification_configuration(
            Bucket=BUCKET, NotificationConfiguration={"EventBridgeConfiguration": {}}
        )
        queue = sqs.create_queue(QueueName="intake")["QueueUrl"]
        queue_arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        events.put_rule(Name="uploads", EventPattern=uploads_pattern(self.template), State="ENABLED")
        events.put_targets(Rule="uploads", Targets=[{"Id": "intake", "Arn": queue_arn}])

        uploads = ["in/data.csv", "notes/analysis-of-q3.csv", "analysis.csv"]
        results = [
            "analysis/in/data.csv/20261130T120000Z-3f2a/status.json",
            "analysis/in/data.csv/20261130T120000Z-3f2a/stdout.log",
            "analysis/in/data.csv/20261130T120000Z-3f2a/.s3spot/attempt-1.json",
            "analysis/in/data.csv/20261130T120000Z-3f2a/output/lines.txt",
        ]
        for key in uploads + results:
            s3.put_object(Bucket=BUCKET, Key=key, Body=b"x")

        arrived = []
        while True:
            batch = sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10).get("Messages", [])
            if not batch:
                break
            for message in batch:
                event = json.loads(message["Body"])
                self.assertEqual((event["source"], event["detail-type"]), ("aws.s3", "Object Created"))
                arrived.append(event["detail"]["object"]["key"])
                sqs.delete_message(QueueUrl=queue, ReceiptHandle=message["ReceiptHandle"])
        # Keys that merely contain "analysis" still arrive: the function's own guard skips them.
        self.assertEqual(sorted(arrived), sorted(uploads))

    @mock_aws
    def test_without_the_key_filter_results_would_arrive(self):
        """Without the key filter, the same rule would queue every result: the filter is what
        keeps them out, not something of moto's."""
        pattern = json.loads(uploads_pattern(self.template))
        del pattern["detail"]["object"]
        s3 = boto3.client("s3", region_name=REGION)
        sqs = boto3.client("sqs", region_name=REGION)
        events = boto3.client("events", region_name=REGION)
        s3.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})
        s3.put_bucket_notification_configuration(
            Bucket=BUCKET, NotificationConfiguration={"EventBridgeConfiguration": {}}
        )
        queue = sqs.create_queue(QueueName="intake")["QueueUrl"]
        queue_arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        events.put_rule(Name="uploads", EventPattern=json.dumps(pattern), State="ENABLED")
        events.put_targets(Rule="uploads", Targets=[{"Id": "intake", "Arn": queue_arn}])
        s3.put_object(Bucket=BUCKET, Key="analysis/in/data.csv/x/status.json", Body=b"{}")
        messages = sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10).get("Messages", [])
        self.assertEqual(len(messages), 1)


if __name__ == "__main__":
    unittest.main()
