#!/usr/bin/env python3
"""Build the quickstart domain dataset: customer-support Q&A for a fictional company.

Writes ``examples/data/support-instructions.jsonl`` (instruction schema: ``instruction``,
``input`` (may be empty), ``output``) and ``examples/data/README.md``.

Everything is generated from templates with a fixed seed, so the file is byte-for-byte
reproducible and needs no network. The company ("Acme Cloud"), its products, policies,
people and order numbers are all invented. The answers follow a small set of consistent
policies (refund window, shipping times, plan prices, ...) and repeat the slot values from the
question, so a small model can learn the domain: after fine-tuning, its held-out loss drops
clearly below the base model's.

Usage: python scripts/build_quickstart_data.py [--out-dir examples/data] [--rows 2000] [--seed 1234]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
from pathlib import Path

COMPANY = "Acme Cloud"

PLANS = {"Starter": 9, "Pro": 29, "Business": 79, "Enterprise": 249}
PRODUCTS = [
    "Acme Router X2", "Acme Cloud Drive", "Acme Smart Hub", "Acme Backup Box",
    "Acme Mesh Node", "Acme Security Camera", "Acme Desk Dock", "Acme Travel Charger",
]
FIRST_NAMES = [
    "Alice", "Ben", "Carla", "David", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas",
    "Kemi", "Liam", "Maya", "Noah", "Olga", "Priya", "Quinn", "Rosa", "Sam", "Tara",
    "Umar", "Vera", "Wen", "Yusuf", "Zoe",
]
COUNTRIES = ["Canada", "Germany", "France", "Japan", "Brazil", "India", "Australia", "Spain", "Mexico", "Kenya"]
CITIES = ["Boston", "Denver", "Austin", "Seattle", "Chicago", "Portland", "Atlanta", "Phoenix", "Toronto", "Dublin"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]
CARRIERS = ["FastShip", "ParcelGo", "BlueLine Express"]
BROWSERS = ["Chrome", "Firefox", "Safari", "Edge"]
DEVICES = ["iPhone", "Android phone", "laptop", "tablet"]
REGIONS = ["us-east", "us-west", "eu-central", "ap-south"]

REFUND_DAYS = 30
RETURN_DAYS = 14
SUPPORT_HOURS = "Monday to Friday, 8 am to 8 pm Eastern Time"


def order_id(r: random.Random) -> str:
    return f"AC-{r.randint(100000, 999999)}"


def ticket_id(r: random.Random) -> str:
    return f"T-{r.randint(10000, 99999)}"


def money(amount: float) -> str:
    return f"${amount:,.2f}"


def date(r: random.Random) -> str:
    return f"{r.choice(MONTHS)} {r.randint(1, 28)}"


# Each intent returns (instruction, input, output). The instruction is the customer's message,
# the input optional account context, and the output the agent's reply.

def refund(r: random.Random):
    plan = r.choice(list(PLANS))
    days = r.randint(1, 60)
    ask = r.choice([
        f"I was charged for the {plan} plan {days} days ago and I want a refund.",
        f"Can I get my money back for the {plan} plan? I paid {days} days ago.",
        f"Please refund my {plan} subscription, I subscribed {days} days ago.",
        f"I no longer need the {plan} plan that I bought {days} days ago. Refund please.",
    ])
    price = money(PLANS[plan])
    if days <= REFUND_DAYS:
        out = (f"Of course. Your {plan} plan payment of {price} was made {days} days ago, which is within "
               f"our {REFUND_DAYS}-day refund window, so you are eligible for a full refund. I have started "
               f"the refund of {price}; it will reach your original payment method in 5 to 7 business days.")
    else:
        out = (f"I'm sorry, but your {plan} plan payment was made {days} days ago. Refunds are only available "
               f"within {REFUND_DAYS} days of payment, so this charge of {price} is not eligible. You can cancel "
               f"at any time to avoid the next charge.")
    return ask, "", out


def double_charge(r: random.Random):
    plan = r.choice(list(PLANS))
    d = date(r)
    ask = r.choice([
        f"I was billed twice for my {plan} plan on {d}.",
        f"There are two identical charges on my card from {d} for the {plan} plan.",
        f"Why did you charge me two times on {d}? I only have one {plan} subscription.",
    ])
    price = money(PLANS[plan])
    out = (f"I'm sorry about the duplicate charge. I can see two payments of {price} for the {plan} plan "
           f"on {d}. I have refunded the second payment of {price}; you will see it on your statement in "
           f"5 to 7 business days.")
    return ask, "", out


def change_plan(r: random.Random):
    old, new = r.sample(list(PLANS), 2)
    ask = r.choice([
        f"How do I switch from the {old} plan to the {new} plan?",
        f"I want to move my account from {old} to {new}.",
        f"Can you change my subscription from {old} to {new}?",
        f"Please change my plan to {new}. I am on {old} right now.",
    ])
    direction = "upgrade" if PLANS[new] > PLANS[old] else "downgrade"
    if direction == "upgrade":
        tail = (f"The upgrade takes effect right away and you pay the prorated difference for the rest of "
                f"this billing month.")
    else:
        tail = (f"The downgrade takes effect at the start of your next billing month, so you keep the "
                f"{old} features until then.")
    out = (f"You can {direction} from {old} ({money(PLANS[old])} per month) to {new} "
           f"({money(PLANS[new])} per month) under Settings > Billing > Change plan. {tail}")
    return ask, "", out


def cancel(r: random.Random):
    plan = r.choice(list(PLANS))
    name = r.choice(FIRST_NAMES)
    ask = r.choice([
        "How do I cancel my subscription?",
        "I want to cancel my account plan.",
        "Please cancel my subscription at the end of the month.",
        "What is the way to stop my monthly payments?",
    ])
    ctx = f"Customer: {name}. Plan: {plan}."
    out = (f"Hi {name}, you can cancel your {plan} plan under Settings > Billing > Cancel subscription. "
           f"You keep access until the end of the current billing month and you will not be charged "
           f"again. Your files stay available for 30 days after that.")
    return ask, ctx, out


def invoice(r: random.Random):
    m = r.choice(MONTHS)
    ask = r.choice([
        f"Where can I download my invoice for {m}?",
        f"I need a copy of the {m} invoice for my accountant.",
        f"Can you send me the invoice from {m}?",
    ])
    out = (f"You can download your {m} invoice as a PDF under Settings > Billing > Invoices. If you need "
           f"a company name or tax number on it, add them under Billing details first and the {m} invoice "
           f"will be updated.")
    return ask, "", out


def payment_method(r: random.Random):
    card = r.choice(["Visa", "Mastercard", "American Express"])
    last4 = f"{r.randint(0, 9999):04d}"
    ask = r.choice([
        f"My {card} ending in {last4} expired. How do I update my card?",
        f"I want to replace my {card} card ending in {last4} with a new one.",
        f"How can I change the payment card? The old {card} ends in {last4}.",
    ])
    out = (f"Go to Settings > Billing > Payment method and choose Replace card. Once the new card is saved, "
           f"your {card} ending in {last4} is removed and future charges go to the new card.")
    return ask, "", out


def reset_password(r: random.Random):
    dev = r.choice(DEVICES)
    ask = r.choice([
        "I forgot my password and cannot log in.",
        f"How do I reset my password on my {dev}?",
        "The login page says my password is wrong. What should I do?",
        "I am locked out of my account.",
    ])
    out = ("Click Forgot password on the sign-in page and enter your account email. We send a reset link "
           "that is valid for 60 minutes. If the email does not arrive within 10 minutes, check your spam "
           "folder or reply here and we will send it again.")
    return ask, "", out


def two_factor(r: random.Random):
    dev = r.choice(DEVICES)
    ask = r.choice([
        f"I lost my {dev} and cannot get my two-factor code.",
        f"My authenticator app was on my old {dev}. How do I sign in?",
        f"I got a new {dev} and two-factor authentication no longer works.",
    ])
    out = (f"Sign in with one of the backup codes you saved when you turned on two-factor authentication, "
           f"then set up the authenticator again on your new {dev} under Settings > Security. If you have no "
           f"backup codes, reply with a photo ID and we will verify your identity within 2 business days.")
    return ask, "", out


def change_email(r: random.Random):
    name = r.choice(FIRST_NAMES)
    new = f"{name.lower()}.{r.choice(['work', 'home', 'mail', 'acct'])}{r.randint(1, 99)}@example.com"
    ask = r.choice([
        f"I want to change my account email to {new}.",
        f"Please update my email address to {new}.",
        f"How do I use {new} as my login email?",
    ])
    out = (f"Go to Settings > Profile > Email, enter {new} and confirm with your password. We send a "
           f"verification link to {new}; the change is complete once you click it.")
    return ask, "", out


def add_member(r: random.Random):
    plan = r.choice(["Pro", "Business", "Enterprise"])
    n = r.randint(2, 12)
    limits = {"Pro": 5, "Business": 25, "Enterprise": 500}
    ask = r.choice([
        f"How do I add {n} people to my team?",
        f"Can I invite {n} coworkers to my account?",
        f"I need to give {n} colleagues access to our workspace.",
    ])
    ctx = f"Plan: {plan}."
    lim = limits[plan]
    if n <= lim:
        out = (f"Your {plan} plan includes up to {lim} team members, so you can add all {n}. Go to Settings > "
               f"Team > Invite and enter their email addresses. Each person gets an invitation link.")
    else:
        out = (f"Your {plan} plan includes up to {lim} team members, so you cannot add {n} people yet. "
               f"Upgrade your plan under Settings > Billing, then invite them under Settings > Team > Invite.")
    return ask, ctx, out


def delete_account(r: random.Random):
    ask = r.choice([
        "Please delete my account and all my data.",
        "How do I permanently close my Acme Cloud account?",
        "I want you to erase everything you store about me.",
    ])
    out = ("You can delete your account under Settings > Profile > Delete account. We first cancel any "
           "active plan, then permanently erase your files and personal data within 30 days. This cannot "
           "be undone, so download anything you want to keep first.")
    return ask, "", out


def track_order(r: random.Random):
    oid = order_id(r)
    carrier = r.choice(CARRIERS)
    product = r.choice(PRODUCTS)
    city = r.choice(CITIES)
    ask = r.choice([
        f"Where is my order {oid}?",
        f"Can you tell me the status of order {oid}?",
        f"I ordered the {product} and want to track it. Order {oid}.",
        f"My order {oid} has not arrived yet.",
    ])
    ctx = f"Order {oid}: {product}, shipped with {carrier} to {city}."
    out = (f"Your order {oid} ({product}) has shipped with {carrier} and is on its way to {city}. Standard "
           f"delivery takes 3 to 5 business days. You can follow it with the tracking link in your shipping "
           f"confirmation email.")
    return ask, ctx, out


def change_address(r: random.Random):
    oid = order_id(r)
    city = r.choice(CITIES)
    shipped = r.random() < 0.5
    ask = r.choice([
        f"I need to change the delivery address of order {oid} to {city}.",
        f"Can you send order {oid} to my new address in {city}?",
        f"I moved to {city}. Please update the address on order {oid}.",
    ])
    ctx = f"Order {oid} status: {'shipped' if shipped else 'processing'}."
    if shipped:
        out = (f"Order {oid} has already shipped, so we can no longer change its address. Once it is "
               f"delivered or returned to us, we can send it to {city} at no extra cost.")
    else:
        out = (f"Order {oid} has not shipped yet, so I have updated the delivery address to {city}. You "
               f"will receive a confirmation email with the new address.")
    return ask, ctx, out


def late_delivery(r: random.Random):
    oid = order_id(r)
    days = r.randint(2, 15)
    ask = r.choice([
        f"My order {oid} is {days} days late.",
        f"Order {oid} should have arrived {days} days ago.",
        f"It has been {days} extra days and order {oid} is still not here.",
    ])
    if days >= 7:
        out = (f"I'm sorry that order {oid} is {days} days late. Because it is more than 7 days past the "
               f"expected date, I have sent a free replacement by express shipping. You do not need to "
               f"return the first package if it arrives.")
    else:
        out = (f"I'm sorry that order {oid} is {days} days late. Carriers sometimes need up to 7 extra days. "
               f"If it has not arrived after that, reply here and we will send a free replacement.")
    return ask, "", out


def damaged_item(r: random.Random):
    oid = order_id(r)
    product = r.choice(PRODUCTS)
    ask = r.choice([
        f"The {product} from order {oid} arrived broken.",
        f"My {product} was damaged in shipping. Order {oid}.",
        f"I received a cracked {product}. What can I do? Order number {oid}.",
    ])
    out = (f"I'm sorry your {product} arrived damaged. Please send a photo of the item and the box, and "
           f"we will ship a new {product} for order {oid} right away. You will get a prepaid label to "
           f"return the damaged one.")
    return ask, "", out


def return_item(r: random.Random):
    oid = order_id(r)
    product = r.choice(PRODUCTS)
    days = r.randint(1, 40)
    ask = r.choice([
        f"I want to return the {product} I received {days} days ago. Order {oid}.",
        f"Can I send back the {product}? It arrived {days} days ago.",
        f"How do I return my {product}? I got it {days} days ago.",
    ])
    if days <= RETURN_DAYS:
        out = (f"Yes. You received the {product} {days} days ago, which is within our {RETURN_DAYS}-day "
               f"return period. Start the return under Orders > Return item and print the prepaid label. "
               f"We refund you within 5 business days after the {product} arrives at our warehouse.")
    else:
        out = (f"I'm sorry, but you received the {product} {days} days ago and returns are accepted within "
               f"{RETURN_DAYS} days of delivery. It is still covered by our 2-year warranty if it stops working.")
    return ask, "", out


def international(r: random.Random):
    country = r.choice(COUNTRIES)
    product = r.choice(PRODUCTS)
    ask = r.choice([
        f"Do you ship the {product} to {country}?",
        f"Can I order the {product} from {country}?",
        f"How long does shipping to {country} take?",
    ])
    out = (f"Yes, we ship to {country}. International delivery takes 7 to 14 business days and costs a "
           f"flat $25.00. Import taxes in {country} are paid on delivery.")
    return ask, "", out


def outage(r: random.Random):
    region = r.choice(REGIONS)
    t = ticket_id(r)
    ask = r.choice([
        f"My servers in {region} are not responding.",
        f"Is there an outage in the {region} region?",
        f"Everything in {region} seems to be down since this morning.",
    ])
    out = (f"Thank you for reporting this. I have opened ticket {t} for the {region} region and our "
           f"engineers are looking at it now. You can follow live updates on the status page, and we will "
           f"email you when ticket {t} is resolved.")
    return ask, "", out


def api_key(r: random.Random):
    ask = r.choice([
        "How do I create a new API key?",
        "I think my API key was leaked. What should I do?",
        "Where do I find my API key?",
        "My API key stopped working.",
    ])
    out = ("Go to Settings > Developer > API keys. You can create a new key there and revoke any old key "
           "with one click. A revoked key stops working immediately, so update your applications with the "
           "new key first.")
    return ask, "", out


def storage(r: random.Random):
    plan = r.choice(list(PLANS))
    quota = {"Starter": 100, "Pro": 1000, "Business": 5000, "Enterprise": 20000}[plan]
    used = r.randint(50, 100)
    ask = r.choice([
        f"My storage is {used}% full. What are my options?",
        f"I keep getting a warning that I used {used}% of my storage.",
        f"How much storage do I have? The app says {used}% used.",
    ])
    ctx = f"Plan: {plan}."
    out = (f"Your {plan} plan includes {quota:,} GB of storage and you have used {used}% of it. You can "
           f"free up space by emptying the trash, or upgrade your plan under Settings > Billing for more storage.")
    return ask, ctx, out


def login_browser(r: random.Random):
    browser = r.choice(BROWSERS)
    ask = r.choice([
        f"The dashboard does not load in {browser}.",
        f"I see a blank page in {browser} after I sign in.",
        f"{browser} keeps showing an error on the Acme Cloud dashboard.",
    ])
    out = (f"Please clear the cache and cookies in {browser}, turn off browser extensions, and sign in "
           f"again. The dashboard supports the two latest versions of {browser}. If it still fails, reply "
           f"with a screenshot and we will look into it.")
    return ask, "", out


def hours(r: random.Random):
    ask = r.choice([
        "When is your support team available?",
        "What are your support hours?",
        "Can I call support on the weekend?",
        "How do I contact a human?",
    ])
    out = (f"Our support team is available {SUPPORT_HOURS}. You can reach us by chat in the dashboard or "
           f"by email at any time, and we answer emails within one business day.")
    return ask, "", out


def pricing(r: random.Random):
    plan = r.choice(list(PLANS))
    ask = r.choice([
        f"How much does the {plan} plan cost?",
        f"What is the price of {plan}?",
        f"Is the {plan} plan billed monthly?",
    ])
    yearly = PLANS[plan] * 10
    out = (f"The {plan} plan costs {money(PLANS[plan])} per month when billed monthly, or "
           f"{money(yearly)} per year when billed yearly, which gives you two months free.")
    return ask, "", out


INTENTS = [
    refund, double_charge, change_plan, cancel, invoice, payment_method, reset_password, two_factor,
    change_email, add_member, delete_account, track_order, change_address, late_delivery,
    damaged_item, return_item, international, outage, api_key, storage, login_browser, hours, pricing,
]

GREETINGS = ["", "", "", "Hi, ", "Hello, ", "Hey there. ", "Good morning. "]
LOWER_AFTER_GREETING = {
    "How", "Can", "Where", "What", "Why", "Please", "My", "The", "There", "Is", "Do", "When",
    "Everything", "It", "Order",
}
INSTRUCTION_PREFIX = [
    "Answer this customer message as an Acme Cloud support agent: ",
    "You are a support agent for Acme Cloud. Reply to the customer: ",
    "Customer message: ",
    "",
]


def build(rows: int, seed: int) -> list[dict]:
    r = random.Random(seed)
    seen: set[str] = set()
    out: list[dict] = []
    attempts = 0
    while len(out) < rows:
        attempts += 1
        if attempts > rows * 50:
            raise RuntimeError("could not generate enough unique rows")
        intent = INTENTS[len(out) % len(INTENTS)] if r.random() < 0.5 else r.choice(INTENTS)
        ask, ctx, answer = intent(r)
        greet = r.choice(GREETINGS)
        if greet:
            first = ask.split(" ", 1)[0]
            ask = greet + (ask[0].lower() + ask[1:] if greet.endswith(", ") and first in LOWER_AFTER_GREETING else ask)
        instruction = r.choice(INSTRUCTION_PREFIX) + ask
        key = instruction + "\x00" + ctx
        if key in seen:
            continue
        seen.add(key)
        out.append({"instruction": instruction, "input": ctx, "output": answer})
    return out


README = """# Quickstart dataset: Acme Cloud customer support

`support-instructions.jsonl` is the domain dataset the quickstart fine-tunes
`examples/models/tailor-tiny-llama` on.

- **What**: {rows} customer-support exchanges for *Acme Cloud*, a fictional company
  (billing, account, shipping, technical questions; {intents} intents). One JSON object per line,
  instruction schema: `instruction` (the customer's message, sometimes with a short task prefix),
  `input` (account or order context; empty for {empty} rows) and `output` (the agent's reply).
- **Provenance**: generated by `scripts/build_quickstart_data.py` (seed {seed}) from hand-written
  templates with randomly filled slots (plans, prices, order numbers, products, cities, dates...).
  No real customer data, no external source; the company, people, products, policies, order
  numbers and email addresses (`example.com`) are invented. Rebuild byte-for-byte with
  `python scripts/build_quickstart_data.py`.
- **sha256**: `{sha}`
- **License**: CC0-1.0 (public domain dedication). The generator script is Apache-2.0 like the
  rest of the project.

The replies follow fixed policies (a {refund}-day refund window, a {ret}-day return period,
3-5 business days shipping, fixed plan prices and team limits) and repeat the slot values of the
question, so the data is learnable by a small model: the fine-tuned model's held-out loss drops
clearly below the base model's.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default=str(Path(__file__).resolve().parent.parent / "examples" / "data"))
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()

    rows = build(args.rows, args.seed)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(row, ensure_ascii=False, sort_keys=False) + "\n" for row in rows).encode("utf-8")
    path = out_dir / "support-instructions.jsonl"
    path.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    empty = sum(1 for row in rows if not row["input"])
    (out_dir / "README.md").write_text(README.format(
        rows=len(rows), intents=len(INTENTS), empty=empty, seed=args.seed, sha=sha,
        refund=REFUND_DAYS, ret=RETURN_DAYS))
    print(f"wrote {path} ({len(rows)} rows, {len(data)} bytes, sha256 {sha})")


if __name__ == "__main__":
    main()
