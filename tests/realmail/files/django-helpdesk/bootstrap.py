"""Prepare a fresh (or existing) django-helpdesk instance in $DH_DIR.

Run with the venv's python, cwd = this directory:
    VENV/bin/python bootstrap.py
Environment: everything mcsite.settings reads (DH_DIR, DH_SMTP_PORT, ...) plus
    DH_IMAP_HOST, DH_IMAP_PORT, DH_IMAP_USER, DH_IMAP_PASSWORD
    DH_AGENT_PASSWORD (optional, default "agent-password", for Basic auth)
Does: migrate; staff superuser "agent" <agent@example.test>; its DRF token;
queue "Support" (slug "support") importing plain IMAP (imaplib.IMAP4, which
django-helpdesk upgrades with STARTTLS when offered, unverified) from INBOX,
email_box_interval 0. Idempotent. stdout carries exactly two lines:
    TOKEN <key>
    QUEUE <id> <slug>
"""

import io
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mcsite.settings")


def required(name):
    value = os.environ.get(name)
    if not value:
        sys.exit(f"bootstrap.py: environment variable {name} is required")
    return value


def main():
    imap_host = required("DH_IMAP_HOST")
    imap_port = int(required("DH_IMAP_PORT"))
    imap_user = required("DH_IMAP_USER")
    imap_password = required("DH_IMAP_PASSWORD")

    instance = os.path.abspath(required("DH_DIR"))
    os.makedirs(os.path.join(instance, "media"), exist_ok=True)

    import django

    django.setup()

    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from rest_framework.authtoken.models import Token

    from helpdesk.models import Queue

    out = io.StringIO()
    call_command("migrate", verbosity=0, interactive=False, stdout=out, stderr=out)
    if out.getvalue().strip():
        sys.stderr.write(out.getvalue())

    User = get_user_model()
    agent, _ = User.objects.get_or_create(
        username="agent", defaults={"email": "agent@example.test"}
    )
    agent.email = "agent@example.test"
    agent.is_staff = True
    agent.is_superuser = True
    agent.is_active = True
    agent.set_password(os.environ.get("DH_AGENT_PASSWORD", "agent-password"))
    agent.save()
    token, _ = Token.objects.get_or_create(user=agent)

    queue, _ = Queue.objects.update_or_create(
        slug="support",
        defaults=dict(
            title="Support",
            email_address=settings.DEFAULT_FROM_EMAIL,
            allow_public_submission=False,
            allow_email_submission=True,
            email_box_type="imap",
            email_box_host=imap_host,
            email_box_port=imap_port,
            email_box_ssl=False,
            email_box_user=imap_user,
            email_box_pass=imap_password,
            email_box_imap_folder="INBOX",
            email_box_interval=0,
            email_box_last_check=None,
            # "info": the queue logger propagates to the stderr handler, whose
            # level (DH_LOG_LEVEL, default WARNING) decides what is shown.
            logging_type="info",
            logging_dir=None,
        ),
    )

    print(f"TOKEN {token.key}")
    print(f"QUEUE {queue.id} {queue.slug}")


if __name__ == "__main__":
    main()
