"""Generate the project's shipped instruction / chat data set (support_instructions.jsonl).

The data set is for the ``causal-lm`` task family: a customer-support assistant answering an online
shop's customers. Every customer message is taken from the shipped ``support_intents.jsonl`` (its
``text`` and ``label``), and every reply comes from hand-written reply templates per intent and
language (English replies for English messages, Chinese for Chinese). When the message names an
order (``#A1234``, ``订单号 58231``) the reply echoes it. Replies are short and say the same thing
for the same intent, so a small model can learn the pattern in a few hundred steps.

Three quarters of the records are instructions (``prompt``, ``response``, and in a third of them
a ``system`` prompt); a quarter are chats (``messages``: optional system, user, assistant, a
follow-up user turn such as "thanks" or "要等多久？", and a matching assistant reply). A fixed seed
drives one ``random.Random``, so running the script again writes a byte-identical file. Before
writing, every record is checked with ``pipeline.chat.role_problem(pipeline.chat.to_messages(r))``,
prompts are de-duplicated after normalisation and replies are held to ``MAX_REPLY_CHARS``; the
script exits non-zero and writes nothing when a check fails.

Regenerate (from the repository root, with the project installed, e.g. in its virtualenv):

    python pipeline/data/build_support_instructions.py

It writes ``support_instructions.jsonl`` next to this script: one JSON object per line, UTF-8,
in a seeded shuffled order. Standard library only, plus this project's ``pipeline.chat``.
"""

from __future__ import annotations

import json
import random
import re
import sys
import unicodedata
from collections import Counter
from pathlib import Path

from pipeline import chat

SEED = 20240612
HERE = Path(__file__).resolve().parent
SOURCE = HERE / "support_intents.jsonl"
OUTPUT = HERE / "support_instructions.jsonl"
PER_INTENT_AND_LANGUAGE = 40  # 10 intents x 2 languages x 40 = 800 records
CHATS_PER_GROUP = 10  # of the 40: 10 chats, 30 instructions (the 75% / 25% mix)
SYSTEM_INSTRUCTIONS_PER_GROUP = 10  # a third of the 30 instructions carry a system prompt
SYSTEM_CHATS_PER_GROUP = 5  # half of the chats open with a system message
MAX_REPLY_CHARS = 160

SYSTEM = {
    "en": "You are a helpful customer-support assistant for an online shop.",
    "zh": "你是一家网店的客服助手，乐于帮助顾客解决问题。",
}

CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
# Order references as build_support_intents.py writes them: "#A1234" / "A1234", "订单号 58231" / "单号58231".
ORDER = {
    "en": re.compile(r"(?<![A-Za-z0-9])#?([A-Za-z]\d{4})(?!\d)"),
    "zh": re.compile(r"(?:订单号|订单|单号)\s?(\d{5})(?!\d)"),
}

# --------------------------------------------------------------------------- replies
# Per intent and language: "order" templates (used when the message names an order; {order} is
# echoed as "#A1234" or "58231") and "plain" templates (used otherwise).

REPLIES = {
    "en": {
        "order_status": {
            "order": [
                "Thanks for reaching out! Order {order} has shipped and is on its way. You'll get an email when it's out for delivery.",
                "I've checked order {order}: it left our warehouse and should arrive within 3-5 business days. You can track it under My Orders.",
                "Order {order} is in transit with the carrier. Tracking can pause for a day between hubs; it should reach you in 3-5 business days.",
            ],
            "plain": [
                "Happy to help! Please share your order number (like #A1234) and I'll check where your package is.",
                "You can see live tracking under My Orders. If you send me your order number, I'll check the latest status for you.",
                "Most orders arrive within 3-5 business days of dispatch. Send me your order number and I'll look up the exact status.",
            ],
        },
        "cancel_order": {
            "order": [
                "I've asked the warehouse to cancel order {order}. If it hasn't shipped yet, you'll get a confirmation email within 24 hours.",
                "No problem! Order {order} is being cancelled. Once it's confirmed, the full amount goes back to your original payment method.",
                "Got it, I've requested cancellation of order {order}. If it has already shipped, you can refuse the parcel or return it for free.",
            ],
            "plain": [
                "Sure! Orders that haven't shipped can be cancelled under My Orders. Send me the order number and I can do it for you.",
                "I can help with that. Please share your order number (like #A1234) and I'll cancel it if it hasn't shipped yet.",
                "Of course. Which order should I cancel? Send me the order number and I'll stop it before it leaves the warehouse.",
            ],
        },
        "refund_request": {
            "order": [
                "I've opened a refund for order {order}. Once approved, it reaches your original payment method within 5-7 business days.",
                "Sorry about that! The refund for order {order} is being processed and should show on your statement within 5-7 business days.",
                "I've checked order {order} and passed it to our refunds team. You'll get an email as soon as the refund is issued.",
            ],
            "plain": [
                "Sorry to hear that! Please send me your order number and I'll start the refund. Refunds take 5-7 business days to appear.",
                "I can help with a refund. Once the return is approved, the money goes back to your original payment method in 5-7 business days.",
                "Refunds go back to the original payment method within 5-7 business days of approval. Share your order number and I'll check yours.",
            ],
        },
        "change_shipping_address": {
            "order": [
                "I can update the address for order {order}. Please send the full new address and I'll change it before it ships.",
                "Sure! Reply with the new address for order {order}. If it has already shipped, I'll ask the carrier to redirect it.",
                "Noted. I've flagged order {order} for an address change; please send the complete new address, including the apartment number.",
            ],
            "plain": [
                "Happy to help! Please share your order number and the full new address, and I'll update it before the order ships.",
                "You can edit the address under My Orders until the order ships. Send me the order number and I'll change it for you.",
                "No problem. Which order is it? Send the order number and the new address, and I'll update the delivery details.",
            ],
        },
        "payment_issue": {
            "order": [
                "Sorry for the trouble! I've checked order {order}. Any duplicate or failed charge is released automatically within 3-5 business days.",
                "I've flagged the payment on order {order} for our billing team. They'll fix it and email you within 24 hours.",
                "Thanks for the details. If order {order} was charged but shows unpaid, the payment is still being matched; it updates within 24 hours.",
            ],
            "plain": [
                "Sorry about that! Please check your card details and billing address, or try another payment method at checkout.",
                "Failed or duplicate charges are usually released by your bank within 3-5 business days. Send me the order number and I'll check it.",
                "I can help with that. Please share the order number and the payment method you used, and I'll check what happened.",
            ],
        },
        "account_login": {
            "order": [
                "Sorry you can't get in! Try 'Forgot password' on the login page. Once you're in, order {order} will be under My Orders.",
                "I can look up order {order} for you while we fix the login. Meanwhile, please update the app or clear your browser cache and try again.",
            ],
            "plain": [
                "Sorry you're having trouble logging in! Please update the app or clear your browser cache, then try again.",
                "Let's fix that. Try 'Forgot password' on the login page, or sign in with a one-time code sent to your email.",
                "If login keeps failing, log out on all devices, update the app and try again. I can also send a verification link to your email.",
            ],
        },
        "password_reset": {
            "plain": [
                "Click 'Forgot password' on the login page and follow the newest link we email you to set a new password.",
                "Reset links are valid for 30 minutes and only the newest one works. If it hasn't arrived, please check your spam folder.",
                "I can help you reset it. Tap 'Forgot password', enter your account email and follow the link in the message we send.",
            ],
        },
        "product_availability": {
            "plain": [
                "This item is out of stock right now; restocks usually take 1-2 weeks. Tap 'Notify me' on the product page to get an email.",
                "The product page shows live stock for each size and colour. If it's sold out, tap 'Notify me' and we'll email you when it's back.",
                "Thanks for your interest! Sold-out items are usually restocked within 1-2 weeks. Add it to your wishlist to get an alert.",
            ],
        },
        "delivery_complaint": {
            "order": [
                "I'm so sorry! I've logged a complaint for order {order}, and our delivery team will contact you within 24 hours.",
                "Sorry about this experience. I've noted the problem with order {order}; we can send a replacement or give you a refund.",
                "Apologies for the trouble! I've asked the carrier to investigate order {order}, and we'll update you within 24 hours.",
            ],
            "plain": [
                "I'm so sorry! Please send your order number and a photo, and we'll arrange a replacement or a refund.",
                "Sorry about that! I've noted your feedback. Share the order number and I'll contact the carrier right away.",
                "Apologies for the trouble. Please send your order number; our delivery team will get back to you within 24 hours.",
            ],
        },
        "talk_to_human": {
            "order": [
                "Of course. I'm transferring you to a member of our team now and passing along the details of order {order}. Please hold on.",
            ],
            "plain": [
                "Of course! I'm connecting you to a human agent now. The current wait is about 5 minutes.",
                "I understand. I'm transferring you to a member of our team; please stay in this chat.",
                "No problem, you're in the queue for a human agent. They'll reply right here in this chat.",
            ],
        },
    },
    "zh": {
        "order_status": {
            "order": [
                "您好！订单{order}已经发货，正在运输途中，预计3-5个工作日送达，可在“我的订单”里查看物流。",
                "帮您查了一下，订单{order}已从仓库发出，物流信息偶尔会延迟更新，请耐心等待。",
                "订单{order}目前在快递运输中，预计3-5个工作日内送达，派送前会短信通知您。",
            ],
            "plain": [
                "您好！请提供一下订单号（例如：订单号 58231），我马上帮您查询物流进度。",
                "您可以在“我的订单”里查看实时物流。把订单号发给我，我也可以帮您查。",
                "一般发货后3-5个工作日送达。麻烦提供订单号，我帮您查一下具体进度。",
            ],
        },
        "cancel_order": {
            "order": [
                "好的，已为您提交订单{order}的取消申请，未发货的话24小时内会收到确认通知。",
                "没问题，订单{order}正在取消中，确认后款项会原路退回到您的支付账户。",
                "收到，已申请取消订单{order}。如果已经发货，您可以拒收或申请免费退货。",
            ],
            "plain": [
                "可以的！未发货的订单可以在“我的订单”里直接取消，也可以把订单号发给我，我帮您操作。",
                "好的，请提供一下订单号，如果还没发货，我马上帮您取消。",
                "没问题，请问要取消哪个订单？发一下订单号，我在出库前帮您拦截。",
            ],
        },
        "refund_request": {
            "order": [
                "已为订单{order}提交退款申请，审核通过后5-7个工作日内原路退回。",
                "抱歉给您带来不便！订单{order}的退款正在处理中，预计5-7个工作日到账。",
                "帮您查了订单{order}，已转给退款专员处理，退款完成后会短信通知您。",
            ],
            "plain": [
                "很抱歉！请提供一下订单号，我帮您申请退款，一般5-7个工作日原路退回。",
                "可以帮您处理退款。退货审核通过后，款项会在5-7个工作日内原路退回。",
                "退款会在审核通过后5-7个工作日内原路退回。发一下订单号，我帮您查一下进度。",
            ],
        },
        "change_shipping_address": {
            "order": [
                "可以修改订单{order}的地址，请把完整的新地址发给我，我在发货前帮您改好。",
                "好的，请回复订单{order}的新收货地址；如果已经发货，我会联系快递帮您转寄。",
                "收到，已标记订单{order}需要改地址，请发一下完整的新地址（包括门牌号）。",
            ],
            "plain": [
                "没问题！请提供订单号和完整的新地址，我在发货前帮您修改。",
                "发货前可以在“我的订单”里自己修改地址，也可以把订单号发给我，我帮您改。",
                "好的，请问是哪个订单？发一下订单号和新地址，我帮您更新收货信息。",
            ],
        },
        "payment_issue": {
            "order": [
                "抱歉给您添麻烦了！已查看订单{order}，重复或失败的扣款会在3-5个工作日内自动退回。",
                "已把订单{order}的支付问题转给财务同事，24小时内处理好并通知您。",
                "订单{order}如果已扣款但显示未支付，系统正在核对，24小时内会自动更新。",
            ],
            "plain": [
                "抱歉！请确认一下支付信息，或者换一种支付方式再试试。",
                "失败或重复的扣款一般会在3-5个工作日内由银行自动退回。发一下订单号，我帮您核实。",
                "可以帮您查。请提供订单号和使用的支付方式，我看看是哪里出了问题。",
            ],
        },
        "account_login": {
            "order": [
                "抱歉登录不上！请先试试登录页的“忘记密码”，登录后可在“我的订单”里查看订单{order}。",
                "我可以先帮您查订单{order}。登录问题请清除缓存或更新APP后再试一次。",
            ],
            "plain": [
                "抱歉给您带来不便！请更新APP或清除浏览器缓存后重新登录试试。",
                "可以试试登录页的“忘记密码”，或者用手机验证码登录。",
                "如果一直登录失败，请退出所有设备并更新APP后再试，我也可以帮您发送验证短信。",
            ],
        },
        "password_reset": {
            "plain": [
                "请在登录页点击“忘记密码”，按短信或邮件里最新的链接设置新密码即可。",
                "重置链接30分钟内有效，且只有最新的一条能用。收不到的话请看看垃圾邮件箱。",
                "可以帮您重置密码。请点击“忘记密码”，输入注册手机号，按验证码提示操作即可。",
            ],
        },
        "product_availability": {
            "plain": [
                "这款商品暂时缺货，一般1-2周补货。点击商品页的“到货通知”，补货后会第一时间提醒您。",
                "商品页会显示各尺码和颜色的实时库存。如果显示缺货，可以点“到货通知”，有货后我们会通知您。",
                "感谢关注！缺货商品通常1-2周内补货，您可以先收藏，补货后会收到提醒。",
            ],
        },
        "delivery_complaint": {
            "order": [
                "非常抱歉！已为订单{order}登记投诉，物流专员会在24小时内联系您处理。",
                "很抱歉给您带来不好的体验。订单{order}的问题已记录，我们可以为您补发或退款。",
                "抱歉让您久等了！已催促快递核查订单{order}，24小时内给您回复处理结果。",
            ],
            "plain": [
                "非常抱歉给您带来不好的体验！请提供订单号和照片，我们会为您补发或退款。",
                "很抱歉！已记录您的反馈。发一下订单号，我马上联系快递核查。",
                "抱歉让您失望了。请提供订单号，物流专员会在24小时内联系您处理。",
            ],
        },
        "talk_to_human": {
            "order": [
                "好的，正在为您转接人工客服，已把订单{order}的信息一并转过去，请稍候。",
            ],
            "plain": [
                "好的，正在为您转接人工客服，请稍候，当前大约需要等待5分钟。",
                "理解您的心情，马上为您转接人工客服，请不要离开对话。",
                "没问题，已为您排队人工客服，客服接入后会直接在这里回复您。",
            ],
        },
    },
}

# --------------------------------------------------------------------------- follow-ups
# The second user turn of a chat and its reply: half generic thanks, half a question about the intent.

THANKS = {
    "en": {
        "users": ["thanks", "Thank you!", "ok thanks", "Great, thanks a lot."],
        "replies": ["You're welcome! Is there anything else I can help you with?", "Happy to help! Have a great day."],
    },
    "zh": {
        "users": ["谢谢", "好的，谢谢", "谢谢你！", "明白了，多谢"],
        "replies": ["不客气！还有其他可以帮您的吗？", "很高兴为您服务，祝您生活愉快！"],
    },
}

FOLLOW_UPS = {
    "en": {
        "order_status": [
            (
                "And how long will it take?",
                "Usually 3-5 business days from dispatch. You'll get an email when it's out for delivery.",
            ),
            (
                "Can I get the tracking number?",
                "Yes, the tracking number is in your shipping email and under My Orders.",
            ),
        ],
        "cancel_order": [
            (
                "Will I get my money back?",
                "Yes, the full amount goes back to your original payment method within 5-7 business days.",
            ),
            (
                "How will I know it's cancelled?",
                "You'll get a confirmation email as soon as the cancellation goes through.",
            ),
        ],
        "refund_request": [
            ("And how long will it take?", "Refunds usually appear within 5-7 business days, depending on your bank."),
            ("Will I get an email?", "Yes, we'll email you as soon as the refund is issued."),
        ],
        "change_shipping_address": [
            (
                "Will it delay the delivery?",
                "It may add 1-2 days at most. You'll get the updated delivery date by email.",
            ),
            ("Is there a fee for that?", "No, changing the address before the order ships is free."),
        ],
        "payment_issue": [
            (
                "When will the extra charge be gone?",
                "Your bank usually releases it within 3-5 business days. If it's still there after that, let us know.",
            ),
            (
                "Can I pay another way?",
                "Yes, we accept cards, PayPal, Apple Pay and Google Pay. Just choose another method at checkout.",
            ),
        ],
        "account_login": [
            (
                "It still doesn't work.",
                "Sorry! Tell me the email on your account and I'll send you a secure login link.",
            ),
            (
                "Do I need to reinstall the app?",
                "Usually not. Updating to the latest version and logging in again is enough.",
            ),
        ],
        "password_reset": [
            (
                "I didn't get the email.",
                "Please check your spam folder. It can take up to 10 minutes; request a new link if it still doesn't arrive.",
            ),
            ("How long is the link valid?", "Reset links are valid for 30 minutes, and only the newest one works."),
        ],
        "product_availability": [
            (
                "Can you let me know when it's back?",
                "Sure! Tap 'Notify me' on the product page and we'll email you as soon as it's back in stock.",
            ),
            (
                "And how long will it take?",
                "Restocks usually take 1-2 weeks. 'Notify me' on the product page will email you when it's back.",
            ),
        ],
        "delivery_complaint": [
            (
                "What happens next?",
                "Our delivery team will contact the carrier and email you within 24 hours with a fix.",
            ),
            ("Can I get a replacement?", "Yes, we can send a replacement at no cost, or refund you if you prefer."),
        ],
        "talk_to_human": [
            ("How long is the wait?", "The current wait is about 5 minutes. Please stay in this chat."),
            ("OK, I'll wait.", "Thanks for your patience! An agent will be with you shortly."),
        ],
    },
    "zh": {
        "order_status": [
            ("大概要多久？", "一般发货后3-5个工作日送达，派送前会短信通知您。"),
            ("能给我物流单号吗？", "物流单号在发货短信和“我的订单”里都能查到。"),
        ],
        "cancel_order": [
            ("钱会退回来吗？", "会的，取消成功后全款会在5-7个工作日内原路退回。"),
            ("怎么知道取消成功了？", "取消成功后您会收到短信通知。"),
        ],
        "refund_request": [
            ("大概要多久？", "一般5-7个工作日到账，具体以银行为准。"),
            ("退款了会通知我吗？", "会的，退款完成后会短信通知您。"),
        ],
        "change_shipping_address": [
            ("会影响送达时间吗？", "最多晚1-2天，新的预计送达时间会短信通知您。"),
            ("改地址要收费吗？", "发货前修改地址是免费的。"),
        ],
        "payment_issue": [
            ("多扣的钱什么时候退？", "银行一般会在3-5个工作日内退回，之后还没到账请再联系我们。"),
            ("可以换别的方式付款吗？", "可以，我们支持支付宝、微信支付和银行卡，结算时换一种方式即可。"),
        ],
        "account_login": [
            ("还是不行", "抱歉！请提供注册手机号，我给您发送一条安全登录链接。"),
            ("需要重新安装APP吗？", "一般不需要，更新到最新版本后重新登录就可以。"),
        ],
        "password_reset": [
            ("我没收到邮件", "请看看垃圾邮件箱，邮件可能延迟10分钟；还没收到的话可以重新发送。"),
            ("链接多久有效？", "重置链接30分钟内有效，且只有最新的一条能用。"),
        ],
        "product_availability": [
            ("到货了能通知我吗？", "可以！点击商品页的“到货通知”，补货后会第一时间提醒您。"),
            ("大概要多久？", "一般1-2周补货，设置“到货通知”后有货会提醒您。"),
        ],
        "delivery_complaint": [
            ("接下来怎么处理？", "物流专员会联系快递核查，24小时内给您补发或退款方案。"),
            ("可以补发吗？", "可以，我们免费为您补发，您也可以选择退款。"),
        ],
        "talk_to_human": [
            ("要等多久？", "目前大约需要等待5分钟，请不要离开对话。"),
            ("好的，我等", "感谢您的耐心！人工客服马上就来。"),
        ],
    },
}

# --------------------------------------------------------------------------- generation


def normalize(text: str) -> str:
    """Form used for de-duplication (as in build_support_intents.py): NFKC, case-folded,
    punctuation/symbols/emoji removed, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(" " if unicodedata.category(ch)[0] in "PS" else ch for ch in text)
    return " ".join(text.split())


def language(text: str) -> str:
    return "zh" if CJK.search(text) else "en"


def order_reference(text: str, lang: str) -> str | None:
    """The order named in a message, as the reply writes it ("#A1234" / "58231"), or None."""
    match = ORDER[lang].search(text)
    if not match:
        return None
    return "#" + match.group(1).upper() if lang == "en" else match.group(1)


class ReplyPicker:
    """Cycles through each template list in a seeded order, so every template is used about equally."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.queues: dict[tuple[str, ...], list[str]] = {}
        self.used: Counter[str] = Counter()

    def pick(self, key: tuple[str, ...], templates: list[str]) -> str:
        queue = self.queues.setdefault(key, [])
        if not queue:
            queue.extend(templates)
            self.rng.shuffle(queue)
        template = queue.pop()
        self.used[template] += 1
        return template


def load_messages() -> dict[tuple[str, str], list[str]]:
    """The shipped customer messages grouped by (intent, language), in file order."""
    groups: dict[tuple[str, str], list[str]] = {}
    with SOURCE.open(encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            groups.setdefault((row["label"], language(row["text"])), []).append(row["text"])
    return groups


def reply_for(message: str, intent: str, lang: str, picker: ReplyPicker) -> str:
    templates = REPLIES[lang][intent]
    order = order_reference(message, lang)
    if order and "order" in templates:
        return picker.pick((lang, intent, "order"), templates["order"]).format(order=order)
    return picker.pick((lang, intent, "plain"), templates["plain"])


def follow_up(intent: str, lang: str, rng: random.Random, picker: ReplyPicker) -> tuple[str, str]:
    if rng.random() < 0.5:
        user = picker.pick((lang, "thanks", "user"), THANKS[lang]["users"])
        return user, picker.pick((lang, "thanks", "reply"), THANKS[lang]["replies"])
    pairs = FOLLOW_UPS[lang][intent]
    user = picker.pick((lang, intent, "follow-up"), [question for question, _ in pairs])
    return user, dict(pairs)[user]


def choose(messages: list[str], intent: str, lang: str, rng: random.Random) -> list[str]:
    """PER_INTENT_AND_LANGUAGE messages, naming an order about as often as the source does, but at
    least twice per order template so that every order reply is seen (some intents rarely name one)."""
    with_order = [m for m in messages if order_reference(m, lang)]
    without = [m for m in messages if not order_reference(m, lang)]
    share = round(PER_INTENT_AND_LANGUAGE * len(with_order) / len(messages))
    floor = 2 * len(REPLIES[lang][intent].get("order", []))
    take = min(len(with_order), max(share, floor))
    chosen = rng.sample(with_order, take) + rng.sample(without, PER_INTENT_AND_LANGUAGE - take)
    rng.shuffle(chosen)  # the position decides the record shape below
    return chosen


def generate(seed: int = SEED) -> list[dict]:
    rng = random.Random(seed)
    picker = ReplyPicker(rng)
    seen: set[str] = set()
    records: list[dict] = []
    for (intent, lang), messages in sorted(load_messages().items()):
        unique = []
        for message in messages:
            key = normalize(message)
            if key and key not in seen:
                seen.add(key)
                unique.append(message)
        chosen = choose(unique, intent, lang, rng)
        for number, message in enumerate(chosen):
            reply = reply_for(message, intent, lang, picker)
            if number < CHATS_PER_GROUP:
                question, answer = follow_up(intent, lang, rng, picker)
                turns = [{"role": "system", "content": SYSTEM[lang]}] if number < SYSTEM_CHATS_PER_GROUP else []
                turns += [
                    {"role": "user", "content": message},
                    {"role": "assistant", "content": reply},
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": answer},
                ]
                records.append({"messages": turns})
            elif number < CHATS_PER_GROUP + SYSTEM_INSTRUCTIONS_PER_GROUP:
                records.append({"system": SYSTEM[lang], "prompt": message, "response": reply})
            else:
                records.append({"prompt": message, "response": reply})
    every_template = [
        t
        for by_lang in REPLIES.values()
        for by_intent in by_lang.values()
        for templates in by_intent.values()
        for t in templates
    ]
    unused = [t for t in every_template if not picker.used[t]]
    if unused:
        raise RuntimeError(f"reply templates never used (change SEED or the templates): {unused}")
    rng.shuffle(records)
    return records


def problems(records: list[dict]) -> list[str]:
    """Every rule a record breaks, as 'record N: ...' lines; empty when the data set is clean."""
    found = []
    prompts: Counter[str] = Counter()
    for number, record in enumerate(records, start=1):
        try:
            messages = chat.to_messages(record)
        except ValueError as exc:
            found.append(f"record {number}: {exc}")
            continue
        problem = chat.role_problem(messages)
        if problem:
            found.append(f"record {number}: {problem}")
        if any(not m["content"].strip() for m in messages):
            found.append(f"record {number}: empty turn")
        first_user = next((m["content"] for m in messages if m["role"] == "user"), "")
        prompts[normalize(first_user)] += 1
        lang = language(first_user)
        for m in messages:
            if m["role"] == "assistant" and len(m["content"]) > MAX_REPLY_CHARS:
                found.append(f"record {number}: reply of {len(m['content'])} characters > {MAX_REPLY_CHARS}")
            if m["role"] != "user" and language(m["content"]) != lang:
                found.append(f"record {number}: {m['role']} turn not in the customer's language ({lang})")
    found += [f"prompt repeated {n} times after normalisation: {key!r}" for key, n in prompts.items() if n > 1]
    return found


def shape(record: dict) -> str:
    if "messages" in record:
        return "chat+system" if record["messages"][0]["role"] == "system" else "chat"
    return "instruction+system" if "system" in record else "instruction"


def main() -> int:
    records = generate()
    lines = [json.dumps(record, ensure_ascii=False) for record in records]
    found = problems([json.loads(line) for line in lines])  # check what a reader of the file will see
    if found:
        print(f"{len(found)} problem(s); {OUTPUT.name} not written:", *found[:20], sep="\n  ", file=sys.stderr)
        return 1
    with OUTPUT.open("w", encoding="utf-8", newline="\n") as handle:
        handle.writelines(line + "\n" for line in lines)
    print(f"wrote {len(records)} records to {OUTPUT}", file=sys.stderr)
    counts = Counter((shape(r), language(chat.to_messages(r)[-1]["content"])) for r in records)
    for kind in ("instruction", "instruction+system", "chat", "chat+system"):
        print(f"  {kind:<20} en {counts[kind, 'en']:>3}  zh {counts[kind, 'zh']:>3}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
