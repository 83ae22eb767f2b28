#!/usr/bin/env python3
"""Writes a device registry import file (CSV) of N generated devices to stdout.

Usage: scripts/gen-devices.py [N]   (default 1 000 000)
"""
import sys

n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
out = sys.stdout
out.write("id,name,address,delivery,tags,group,location,version,last_seen,health\n")
for i in range(n):
    tag = "canary" if i % 20 == 0 else "main"
    out.write(
        f"pos-{i:07d},Till {i},127.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}:8080,http,"
        f"{tag};eu,g{i % 50},loc{i % 200},1.{i % 5}.{i % 3},"
        f"2026-11-{1 + i % 20:02d}T10:00:00Z,healthy\n"
    )
