#!/usr/bin/env python3
"""An independent IMAP client for the sandbox's IMAP server: Python's imaplib.

Usage: imaplib_client.py HOST PORT USER PASSWORD EXPECTED_SUBJECT

Logs in, selects INBOX, finds the message whose subject contains EXPECTED_SUBJECT, fetches it
without marking it seen, deletes and expunges it, and prints what it saw as one JSON object.
Exits 1 (with {"error": ...}) on any protocol failure, so the Rust test shows why.
"""

import imaplib
import json
import re
import sys


def check(typ, data, what):
    if typ != "OK":
        raise RuntimeError(f"{what} answered {typ}: {data!r}")
    return data


def main():
    host, port, user, password, subject = sys.argv[1:6]
    result = {}
    imap = imaplib.IMAP4(host, int(port), timeout=10)
    try:
        result["capabilities"] = sorted(imap.capabilities)
        check(*imap.login(user, password), "LOGIN")
        data = check(*imap.select("INBOX"), "SELECT")
        result["exists"] = int(data[0])
        result["uidvalidity"] = int(imap.untagged_responses.get("UIDVALIDITY", [b"0"])[0])

        # imaplib does not quote arguments itself.
        data = check(*imap.uid("SEARCH", None, "SUBJECT", f'"{subject}"'), "UID SEARCH")
        uids = data[0].split()
        result["found_uids"] = [int(u) for u in uids]
        if len(uids) != 1:
            raise RuntimeError(f"expected one message with subject {subject!r}, got {uids!r}")
        uid = uids[0].decode()

        data = check(
            *imap.uid("FETCH", uid, "(BODY.PEEK[] RFC822.SIZE FLAGS INTERNALDATE)"), "UID FETCH"
        )
        # imaplib splits the response at the literal: (text before, literal), then the rest.
        prefix, body = data[0]
        rest = b"".join(part for part in data[1:] if isinstance(part, bytes))
        meta = (prefix + rest).decode()
        size = int(re.search(r"RFC822\.SIZE (\d+)", meta).group(1))
        result["size_matches"] = size == len(body)
        result["subject_in_body"] = subject.encode() in body
        result["seen_after_peek"] = "\\Seen" in meta
        result["has_internaldate"] = "INTERNALDATE" in meta

        check(*imap.uid("STORE", uid, "+FLAGS", "(\\Deleted)"), "UID STORE")
        data = check(*imap.expunge(), "EXPUNGE")
        result["expunged"] = [int(x) for x in data if x is not None]
        data = check(*imap.uid("SEARCH", None, "ALL"), "UID SEARCH ALL")
        result["remaining_uids"] = [int(u) for u in data[0].split()]
        data = check(*imap.status("INBOX", "(MESSAGES UIDNEXT UIDVALIDITY UNSEEN)"), "STATUS")
        result["status"] = data[0].decode()
        typ, _ = imap.logout()
        result["logout"] = typ
    except Exception as e:  # noqa: BLE001 - report anything to the Rust side
        print(json.dumps({"error": str(e), "partial": result}))
        sys.exit(1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
