"""Generate the project's customer-support intent data set, ``support_intents.jsonl``.

Synthetic, written by the project: English and Chinese templates crossed with slot fillers
(order numbers, products, cities, dates, payment methods, politeness, the odd typo or emoji),
seeded, de-duplicated after normalisation. Running it twice gives byte-identical output.

    python pipeline/data/build_support_intents.py
"""

from __future__ import annotations

import json
import random
import re
import unicodedata
from collections import Counter
from pathlib import Path

SEED = 20261129
PER_INTENT = 160  # half English, half Chinese
OUT = Path(__file__).resolve().parent / "support_intents.jsonl"

SLOTS = {
    "order": lambda r: r.choice(["#A", "#B", "#C", "order ", "order #"]) + str(r.randint(1000, 99999)),
    "zh_order": lambda r: r.choice(["订单号 ", "订单 ", "单号", "#"]) + str(r.randint(1000, 99999)),
    "product": lambda r: r.choice(["wireless earbuds", "running shoes", "the blue jacket", "a coffee maker",
                                   "the phone case", "a yoga mat", "the desk lamp", "kids' backpack",
                                   "the 4K monitor", "a gift card", "the air fryer", "bluetooth speaker"]),
    "zh_product": lambda r: r.choice(["无线耳机", "跑鞋", "蓝色外套", "咖啡机", "手机壳", "瑜伽垫", "台灯",
                                      "儿童书包", "显示器", "礼品卡", "空气炸锅", "蓝牙音箱"]),
    "city": lambda r: r.choice(["Berlin", "Austin", "Toronto", "Leeds", "Lyon", "Osaka", "Denver", "Dublin"]),
    "zh_city": lambda r: r.choice(["上海", "北京", "杭州", "成都", "深圳", "南京", "武汉", "西安"]),
    "day": lambda r: r.choice(["yesterday", "last week", "on Monday", "three days ago", "two weeks ago",
                               "on the 3rd", "last Friday"]),
    "zh_day": lambda r: r.choice(["昨天", "上周", "周一", "三天前", "两周前", "上个月", "前天"]),
    "pay": lambda r: r.choice(["credit card", "PayPal", "debit card", "Apple Pay", "bank transfer"]),
    "zh_pay": lambda r: r.choice(["信用卡", "支付宝", "微信支付", "银行卡", "花呗"]),
}

EN = {
    "order_status": [
        "where is my order {order}", "can you tell me the status of {order}", "has {order} shipped yet",
        "I ordered {product} {day}, when will it arrive", "what's the tracking number for {order}",
        "is my package with {product} on its way", "my order {order} still says processing, any update",
        "how long until {order} gets to {city}", "when does {product} ship", "track {order} for me",
        "any news on the delivery date for {order}", "did you send out my {product} yet",
        "I'd like an update on {order}", "is {order} out for delivery today",
    ],
    "cancel_order": [
        "cancel my order {order}", "I want to cancel {order} before it ships", "please stop {order}, I changed my mind",
        "I ordered {product} by mistake, cancel it", "how do I cancel an order I placed {day}",
        "can I still cancel {order}", "don't ship {order}, I no longer need it", "cancel the {product} order",
        "I need to call off my order for {product}", "withdraw order {order} please",
        "is it too late to cancel {order}", "I placed a duplicate order {day}, cancel one of them",
        "cancel everything in {order}", "scrap my purchase of {product}",
    ],
    "refund_request": [
        "I want a refund for {order}", "how do I get my money back for {product}", "refund {order} to my {pay}",
        "I returned {product} {day}, where is my refund", "can I get a refund on {order}",
        "the {product} was faulty, I want my money back", "when will the refund for {order} hit my {pay}",
        "please refund me for {product}", "I sent the parcel back {day} and still no refund",
        "request a full refund for {order}", "my refund for {order} hasn't arrived",
        "give me a refund, the {product} doesn't work", "how long do refunds to {pay} take",
        "refund the shipping fee on {order}",
    ],
    "change_shipping_address": [
        "change the delivery address for {order}", "I moved to {city}, update the address on {order}",
        "ship {order} to a different address", "can I update where {product} gets delivered",
        "wrong address on {order}, please fix it", "send my {product} to my office in {city} instead",
        "update shipping address to {city}", "I typed the wrong street for {order}",
        "deliver {order} to my new place in {city}", "edit the address before {order} ships",
        "how do I change the address on an order placed {day}", "redirect {order} to {city}",
        "my apartment number is missing on {order}", "please change the postcode on {order}",
    ],
    "payment_issue": [
        "my {pay} was declined", "I was charged twice for {order}", "payment failed when buying {product}",
        "why did my {pay} get charged {day}", "checkout keeps rejecting my {pay}",
        "I see a pending charge for {order} but no order", "can't pay with {pay}",
        "the payment page errors out for {product}", "you billed my {pay} the wrong amount",
        "double charge on my {pay} for {order}", "my card was charged but the order didn't go through",
        "is there a problem with {pay} payments today", "the price charged for {product} is wrong",
        "payment for {order} shows as failed",
    ],
    "account_login": [
        "I can't log in to my account", "login page keeps saying invalid credentials",
        "my account is locked after too many attempts", "can't sign in since {day}",
        "the app logs me out every time", "two-factor code never arrives when I log in",
        "I can't access my account on the website", "sign in fails with an error",
        "my account says it's suspended", "how do I unlock my account",
        "I get stuck on the login screen", "login not working from {city}",
        "it won't let me sign in with my email", "account access blocked, please help",
    ],
    "password_reset": [
        "I forgot my password", "how do I reset my password", "the password reset link expired",
        "never got the reset password email", "I need a new password for my account",
        "reset link sent {day} doesn't work", "change my password please", "send me a password reset",
        "can't remember my password, help", "password reset page gives an error",
        "how do I set a new password", "my reset email went to spam and now it expired",
        "I want to update my password", "help me recover my password",
    ],
    "product_availability": [
        "is {product} in stock", "when will {product} be back in stock", "do you have {product} in size M",
        "can I buy {product} in {city} stores", "is {product} available in black",
        "will you restock {product}", "is {product} sold out everywhere", "do you still sell {product}",
        "notify me when {product} is available", "how many {product} do you have left",
        "is {product} available for delivery to {city}", "does {product} come in other colours",
        "can I preorder {product}", "is the {product} discontinued",
    ],
    "delivery_complaint": [
        "my package arrived damaged", "the courier left {order} in the rain", "{product} arrived broken",
        "I got the wrong item in {order}", "the parcel was marked delivered but I never got it",
        "items missing from {order}", "the delivery driver was rude", "{order} came two weeks late",
        "the box for {product} was crushed", "my order was delivered to the wrong house in {city}",
        "this is the third late delivery, unacceptable", "received someone else's {product}",
        "delivery said {day} but nothing showed up", "the package for {order} was opened",
    ],
    "talk_to_human": [
        "let me talk to a real person", "I want to speak to an agent", "connect me to customer service",
        "can I call someone about {order}", "get me a human please", "this bot isn't helping, transfer me",
        "is there a phone number I can call", "I need to speak to a manager", "live chat with an agent",
        "put me through to support about {product}", "can a person call me back", "operator please",
        "I'd rather talk to a human about {order}", "escalate this to a supervisor",
    ],
}

ZH = {
    "order_status": [
        "我的订单{zh_order}到哪了", "请问{zh_order}发货了吗", "{zh_order}现在是什么状态", "我{zh_day}买的{zh_product}什么时候到",
        "{zh_order}的物流单号是多少", "帮我查一下{zh_order}", "{zh_product}还在路上吗", "{zh_order}一直显示处理中",
        "寄到{zh_city}要几天", "{zh_order}今天能送到吗", "我的{zh_product}发出去了没有", "想知道{zh_order}的配送进度",
        "快递到哪里了", "{zh_order}什么时候能签收",
    ],
    "cancel_order": [
        "我要取消订单{zh_order}", "{zh_order}还没发货，帮我取消", "不想要了，取消{zh_order}", "{zh_product}下错单了，请取消",
        "{zh_day}下的单怎么取消", "{zh_order}还能取消吗", "别发{zh_order}了，我不需要了", "取消购买{zh_product}",
        "重复下单了，取消其中一个", "撤销订单{zh_order}", "现在取消{zh_order}来得及吗", "帮我把{zh_product}的订单取消掉",
        "{zh_order}全部取消", "我改主意了，订单不要了",
    ],
    "refund_request": [
        "{zh_order}我要退款", "{zh_product}怎么申请退款", "退款退到我的{zh_pay}", "{zh_day}退货了，退款什么时候到",
        "{zh_order}可以退款吗", "{zh_product}有质量问题，要求退钱", "{zh_order}的退款还没到账", "请给我退款",
        "包裹已经寄回去了还没退款", "申请{zh_order}全额退款", "退款到{zh_pay}要多久", "{zh_product}用不了，退钱",
        "运费能退吗", "退款进度怎么查",
    ],
    "change_shipping_address": [
        "修改{zh_order}的收货地址", "我搬到{zh_city}了，帮我改地址", "{zh_order}寄到另一个地址", "{zh_product}能改送货地址吗",
        "{zh_order}地址填错了", "把{zh_product}送到我{zh_city}的公司", "收货地址改成{zh_city}", "门牌号写错了，{zh_order}",
        "{zh_order}改送到新家", "发货前帮我改一下地址", "{zh_day}的订单怎么改地址", "{zh_order}转寄到{zh_city}",
        "邮编写错了，请更正", "收件人电话和地址都要改",
    ],
    "payment_issue": [
        "{zh_pay}支付失败", "{zh_order}被扣了两次钱", "买{zh_product}付款不成功", "{zh_day}{zh_pay}被扣款了但没订单",
        "结账时{zh_pay}一直被拒", "付不了款", "支付页面报错", "扣款金额不对", "{zh_pay}重复扣费",
        "钱扣了订单没生成", "今天{zh_pay}是不是有问题", "{zh_product}的价格扣错了", "{zh_order}显示支付失败",
        "为什么{zh_pay}付款总是失败",
    ],
    "account_login": [
        "我登录不了账号", "登录一直提示密码错误", "尝试太多次账号被锁了", "{zh_day}开始就登不上", "app老是自动退出登录",
        "登录验证码收不到", "网页版进不去账户", "登录时报错", "账号显示被冻结", "怎么解锁账号", "卡在登录页面",
        "在{zh_city}登录不了", "用邮箱登不上去", "账户无法访问，求助",
    ],
    "password_reset": [
        "我忘记密码了", "怎么重置密码", "重置密码的链接过期了", "没收到重置密码的邮件", "我需要设置新密码",
        "{zh_day}发的重置链接打不开", "请帮我改密码", "给我发一个重置密码链接", "密码想不起来了", "重置密码页面出错",
        "怎么修改登录密码", "找回密码", "我想更新密码", "密码重置邮件在垃圾箱里过期了",
    ],
    "product_availability": [
        "{zh_product}有货吗", "{zh_product}什么时候补货", "{zh_product}有M码吗", "{zh_city}门店能买到{zh_product}吗",
        "{zh_product}有黑色的吗", "{zh_product}还会再上架吗", "{zh_product}是不是卖完了", "你们还卖{zh_product}吗",
        "{zh_product}到货了通知我", "{zh_product}还剩几件", "{zh_product}能送到{zh_city}吗", "{zh_product}有别的颜色吗",
        "{zh_product}可以预订吗", "{zh_product}停产了吗",
    ],
    "delivery_complaint": [
        "包裹送到的时候坏了", "快递员把{zh_order}放在外面淋雨了", "{zh_product}到手就是坏的", "{zh_order}发错货了",
        "显示已签收但我没收到", "{zh_order}少发了东西", "送货员态度很差", "{zh_order}晚到了两个星期", "{zh_product}的箱子被压扁了",
        "送到{zh_city}别人家去了", "第三次延迟送达了，太过分", "收到的是别人的{zh_product}", "说{zh_day}送到结果没来",
        "{zh_order}的包裹被拆开过",
    ],
    "talk_to_human": [
        "我要找人工客服", "转人工", "帮我接通客服", "{zh_order}的问题能打电话吗", "请给我真人", "机器人没用，转人工",
        "有客服电话吗", "我要找你们经理", "在线人工客服", "{zh_product}的问题找人工", "能让客服给我回电话吗", "人工服务",
        "我想和真人聊{zh_order}", "投诉升级到主管",
    ],
}

EN_PREFIX = ["", "", "", "hi, ", "hello, ", "hey ", "excuse me, ", "quick question: ", "good morning, "]
EN_SUFFIX = ["", "", "", "?", ".", " please", " thanks", " thank you!", " asap", " 🙏", " 😡"]
ZH_PREFIX = ["", "", "", "您好，", "你好，", "请问", "麻烦", "在吗？"]
ZH_SUFFIX = ["", "", "", "？", "。", "，谢谢", "，急！", "，麻烦了", " 🙏", "！"]
TYPOS = {"order": "ordr", "please": "pls", "refund": "refnd", "address": "adress", "password": "pasword",
         "delivery": "delivry", "account": "acount", "package": "pakage", "cancel": "cancle"}


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold()
    text = re.sub(r"[^\w\s]", "", text)
    return " ".join(text.split())


def fill(template: str, rng: random.Random) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: SLOTS[m.group(1)](rng), template)


def english(template: str, rng: random.Random) -> str:
    text = rng.choice(EN_PREFIX) + fill(template, rng) + rng.choice(EN_SUFFIX)
    if rng.random() < 0.12:
        word = rng.choice([w for w in TYPOS if w in text] or [""])
        text = text.replace(word, TYPOS[word], 1) if word else text
    if rng.random() < 0.2:
        text = text.lower()
    elif rng.random() < 0.6:
        text = text[0].upper() + text[1:]
    return text


def chinese(template: str, rng: random.Random) -> str:
    return rng.choice(ZH_PREFIX) + fill(template, rng) + rng.choice(ZH_SUFFIX)


def build() -> list[dict[str, str]]:
    rng = random.Random(SEED)
    rows, seen = [], set()
    for label in sorted(EN):
        for templates, render in ((EN[label], english), (ZH[label], chinese)):
            made, attempts = 0, 0
            while made < PER_INTENT // 2:
                attempts += 1
                assert attempts < 20000, f"cannot make enough distinct {label} examples"
                text = render(templates[made % len(templates)] if attempts <= len(templates) else
                              rng.choice(templates), rng)
                key = normalize(text)
                if key in seen or not key or len(text) > 200:
                    continue
                seen.add(key)
                rows.append({"text": text, "label": label})
                made += 1
    rng.shuffle(rows)
    return rows


def main() -> None:
    rows = build()
    counts = Counter(r["label"] for r in rows)
    assert len(rows) >= 1400 and min(counts.values()) >= 120
    assert len({normalize(r["text"]) for r in rows}) == len(rows)
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} rows to {OUT}: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))


if __name__ == "__main__":
    main()
