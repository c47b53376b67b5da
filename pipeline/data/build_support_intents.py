"""Generate the project's shipped customer-support intent data set (support_intents.jsonl).

The data set is synthetic and written by this project: every utterance comes from hand-written
sentence templates (at least 12 per intent and language) whose slots are filled from small lists
of fake order numbers, products, cities, dates, payment methods and so on, then dressed with
politeness prefixes/suffixes, the odd emoji, lower-case/no-punctuation typing and a few English
typos. A fixed seed drives one ``random.Random``, so running the script again writes a
byte-identical file. Utterances are de-duplicated after normalisation (NFKC, case-folded,
punctuation and symbols removed, whitespace collapsed) and generation tops up until every intent
reaches its target count.

Regenerate (from the repository root):

    python pipeline/data/build_support_intents.py

It writes ``support_intents.jsonl`` next to this script: one JSON object per line with exactly
the keys ``text`` and ``label``, UTF-8, in a seeded shuffled order. Standard library only.
"""

from __future__ import annotations

import json
import random
import re
import sys
import unicodedata
from collections import Counter
from pathlib import Path

SEED = 20240611
OUTPUT = Path(__file__).resolve().parent / "support_intents.jsonl"
MAX_CHARS = 200
MIN_PER_INTENT = 120
MAX_PER_INTENT = 200
MIN_TOTAL = 1400

# Examples per intent; each is split evenly between English and Chinese.
TARGETS = {
    "order_status": 170,
    "cancel_order": 160,
    "refund_request": 164,
    "change_shipping_address": 150,
    "payment_issue": 160,
    "account_login": 150,
    "password_reset": 156,
    "product_availability": 164,
    "delivery_complaint": 166,
    "talk_to_human": 160,
}

# Intents whose customers tend to be annoyed (chooses the emoji pool).
UPSET = {"delivery_complaint", "talk_to_human", "payment_issue", "refund_request"}

CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")

# --------------------------------------------------------------------------- slot fillers

EN_SLOTS = {
    "product": ["wireless headset", "tennis racket", "coffee maker", "phone case", "yoga mat", "desk lamp",
                "backpack", "air fryer", "bluetooth speaker", "winter jacket", "mechanical keyboard",
                "water bottle", "smart watch", "baby stroller", "blender", "gaming mouse", "rice cooker",
                "hoodie", "office chair", "electric toothbrush"],
    "city": ["Austin", "Leeds", "Toronto", "Melbourne", "Denver", "Dublin", "Seattle", "Manchester",
             "Vancouver", "Auckland", "Chicago", "Glasgow", "Phoenix", "Brisbane"],
    "date": ["yesterday", "last Monday", "last Friday", "two days ago", "on March 3", "on the 12th",
             "last week", "on Sunday", "three days ago", "on June 21", "this morning", "on the 5th"],
    "pay": ["Visa card", "Mastercard", "PayPal", "Apple Pay", "Google Pay", "debit card", "credit card",
            "gift card", "Amex card"],
    "days": ["3 days", "4 days", "a week", "two weeks", "5 days", "ten days", "over a week"],
    "carrier": ["UPS", "DHL", "FedEx", "USPS", "Royal Mail", "local", "Canada Post"],
    "variant": ["in black", "in white", "in grey", "in navy blue", "in red", "in the large size",
                "in the small size", "in the new version", "in pink", "in the upgraded version"],
    "holiday": ["Christmas", "Black Friday", "the holidays", "the end of the month", "Mother's Day"],
    "when": ["this week", "next month", "before the weekend", "any time soon", "by Friday"],
    "qty": ["3", "two", "four", "5", "a few"],
    "where": ["on the app", "on the website", "on my iPhone", "on my laptop", "on my Android phone",
              "in the browser", "on the tablet"],
    "err": ["error 403", "'something went wrong'", "'invalid session'", "error code 1002",
            "'account not verified'"],
}

ZH_SLOTS = {
    "product": ["无线耳机", "跑步鞋", "咖啡机", "手机壳", "瑜伽垫", "台灯", "双肩包", "空气炸锅",
                "蓝牙音箱", "羽绒服", "机械键盘", "保温杯", "智能手表", "婴儿推车", "破壁机",
                "电饭煲", "卫衣", "办公椅", "电动牙刷", "游戏鼠标"],
    "city": ["杭州", "成都", "深圳", "武汉", "南京", "西安", "苏州", "重庆", "厦门", "长沙",
             "青岛", "昆明", "天津", "郑州"],
    "date": ["昨天", "前天", "上周一", "上周五", "3月3日", "12号", "上个星期", "周日",
             "三天前", "6月21日", "今天早上", "5号"],
    "pay": ["支付宝", "微信支付", "银联卡", "信用卡", "花呗", "储蓄卡", "Apple Pay", "云闪付"],
    "days": ["三天", "四天", "一周", "半个月", "五天", "十天", "一个多星期"],
    "carrier": ["顺丰", "中通", "圆通", "韵达", "京东", "EMS", "申通"],
    "variant": ["黑色", "白色", "灰色", "藏青色", "红色", "大号", "小号", "新款", "粉色", "升级版"],
    "holiday": ["双十一", "春节", "618", "国庆", "月底"],
    "when": ["这周", "下个月", "周末前", "月底前", "最近"],
    "qty": ["3", "5", "两", "三", "四"],
    "where": ["APP上", "网页版", "小程序里", "电脑上", "手机上", "平板上"],
    "err": ["系统繁忙", "错误代码403", "会话失效", "网络异常", "账号未验证"],
}

# --------------------------------------------------------------------------- templates
# English templates are written in lower case with a lower-case "i"; styling capitalises them.

EN_TEMPLATES = {
    "order_status": [
        "where is my order {order}?",
        "can you tell me the status of order {order}?",
        "has my {product} shipped yet?",
        "i ordered the {product} {date}, when will it arrive?",
        "tracking for {order} hasn't updated in {days}, is it still moving?",
        "what's the estimated delivery date for my {product}?",
        "is order {order} out for delivery today?",
        "i haven't got a shipping confirmation for {order}, has it been dispatched?",
        "could you check where my package is? order {order}",
        "how long until my {product} gets to {city}?",
        "my order {order} has said processing since {date}, when does it ship?",
        "any update on my order {order}?",
        "when can i expect the {product} i bought {date}?",
        "which carrier is delivering order {order}? do you have a tracking number",
        "is my package still on its way? order number {order}",
    ],
    "cancel_order": [
        "i want to cancel my order {order}",
        "please cancel order {order}, i ordered it by mistake",
        "can i still cancel the {product} i ordered {date}?",
        "how do i cancel an order that hasn't shipped yet {where}?",
        "i changed my mind about the {product}, cancel the order",
        "cancel {order} before it ships",
        "i placed the same order twice, please cancel {order}",
        "is it too late to cancel order {order}? it hasn't left the warehouse",
        "i found the {product} cheaper elsewhere, i'd like to cancel my order",
        "stop my order {order}, i don't need it anymore",
        "please don't send the package for order {order}, i want to cancel it",
        "need to cancel the {product} order i placed {date}",
        "how can i cancel order {order} {where}? i can't find the button",
        "i ordered the wrong size {product}, just cancel the whole order {order}",
    ],
    "refund_request": [
        "i'd like a refund for order {order}",
        "i returned the {product} {date}, when will i get my money back?",
        "can i get a refund on the {product}? it doesn't work",
        "i sent the package back {date}, where is my refund?",
        "how long does a refund take to show up on my {pay}?",
        "my order {order} was cancelled but i haven't been refunded the {amount} yet",
        "i want my money back for the {product}, it's not as described",
        "please refund {amount} to my {pay} for order {order}",
        "the refund for {order} still hasn't arrived after {days}",
        "can i get a partial refund for the {product}? one piece was missing",
        "how do i request a refund for an order i already received?",
        "you said the refund was approved but i see nothing on my {pay}",
        "return the {product} and refund me, order {order}",
        "i never got the {product} so i want a refund for order {order}",
    ],
    "change_shipping_address": [
        "i need to change the shipping address for order {order}",
        "i moved to {city}, can you update the delivery address on my order?",
        "i typed the wrong address for {order}, how do i fix it?",
        "can you ship my {product} to my office instead of my home?",
        "please send order {order} to my new address in {city}",
        "is it possible to change the delivery address after the order has shipped?",
        "wrong zip code on my order {order}, can you update it",
        "i won't be home {date}, can the package go to my parents' place in {city} instead?",
        "how do i edit the address on an order i just placed {where}?",
        "update the shipping address for {order}, the apartment number is missing",
        "can i redirect my package to a pickup point in {city}?",
        "my {product} is going to my old address, please change it",
        "i'm travelling to {city} next week, can you deliver order {order} there?",
        "change the address on my order, i entered my old one by accident",
    ],
    "payment_issue": [
        "my {pay} keeps getting declined at checkout",
        "i was charged twice for order {order}",
        "payment failed but {amount} was still taken from my account",
        "why won't you accept my {pay}?",
        "checkout gives me an error when i try to pay with {pay} {where}",
        "the money left my {pay} but order {order} still says unpaid",
        "i see a pending charge of {amount} i don't recognize",
        "can't complete payment, the page just spins after i enter my card details",
        "my promo code was applied but i was charged the full price of {amount}",
        "the {pay} payment went through but i never got an order confirmation",
        "is there a problem with {pay} today? my payment keeps failing",
        "i got charged {amount} for the {product} but the price on the site was lower",
        "my bank says you declined the transaction, can you check?",
        "payment for order {order} has been stuck on processing since {date}",
    ],
    "account_login": [
        "i can't log into my account {where}",
        "it says my account is locked after too many attempts",
        "the verification code never arrives when i try to sign in {where}",
        "the app keeps logging me out every few minutes",
        "the login page shows {err} when i sign in",
        "i know my password is right but it still says invalid credentials",
        "can't sign in with google anymore, it just loops back to the login page",
        "my account got disabled {date}, why can't i log in?",
        "i made an account with my email but now it says no account found",
        "two-factor authentication isn't working, i'm stuck at the login screen",
        "how do i unlock my account?",
        "logging in works on my laptop but the app won't let me in",
        "i keep getting 'session expired' when i try to log in {where}",
        "i can't access my account to check order {order}",
    ],
    "password_reset": [
        "i forgot my password",
        "how do i reset my password {where}?",
        "the password reset link in the email has expired",
        "i never received the reset password email",
        "i want to change my password, where is the option {where}?",
        "the reset link says invalid token when i click it",
        "forgot my password and the code isn't coming to my phone",
        "can you send me a new password reset link?",
        "my new password isn't accepted, it says it doesn't meet the requirements",
        "i think someone knows my password, i need to change it right now",
        "i can't log in because i forgot my password, help me reset it",
        "why is it asking me to reset my password again?",
        "the forgot password button doesn't do anything {where}",
        "set a new password for my account, i lost the old one",
    ],
    "product_availability": [
        "is the {product} in stock?",
        "when will the {product} be back in stock?",
        "do you have the {product} {variant}?",
        "the {product} says sold out, are you getting more?",
        "can i pre-order the {product}?",
        "can i buy the {product} {variant} in {city}?",
        "is there any stock left of the {product} {variant}?",
        "will you restock the {product} before {holiday}?",
        "is the {product} available in your store in {city}?",
        "notify me when the {product} is available again",
        "why is the {product} {variant} unavailable?",
        "do you still sell the {product} or was it discontinued?",
        "the {product} shows 'only 2 left', can i still order {qty}?",
        "is the {product} {variant} coming back {when}?",
    ],
    "delivery_complaint": [
        "my package arrived damaged, the {product} box was crushed",
        "the courier left my order {order} outside in the rain",
        "tracking says delivered {date} but i never got the package",
        "this is the third time my delivery has been late, really disappointed",
        "the {carrier} driver was rude and threw my package over the fence",
        "order {order} arrived {days} later than promised, unacceptable",
        "i got someone else's package instead of my {product}",
        "the {carrier} driver didn't even knock, just left a note and took my package back",
        "my {product} showed up with the seal broken and scratches all over it",
        "why does delivery to {city} always take so long? this is ridiculous",
        "the package for order {order} was left at the wrong address",
        "half of my order {order} is missing from the box",
        "the delivery guy marked it as delivered but nothing was at my door",
        "i'm very unhappy with the delivery service, my {product} came soaking wet",
        "the {carrier} courier never showed up in the delivery window {date}",
    ],
    "talk_to_human": [
        "i want to talk to a real person",
        "can i speak to an agent",
        "connect me to a human",
        "this bot isn't helping, get me a human",
        "is there a phone number i can call to talk to someone?",
        "agent",
        "transfer me to a customer service representative",
        "i need to speak with a manager about order {order}",
        "stop the automated replies, i want a live agent",
        "can a person call me back about my {product}?",
        "human please",
        "is anyone actually there? i need real support",
        "let me chat with a live person, not a bot",
        "how do i reach your support team directly?",
        "i've been going in circles with this chatbot, put me through to someone",
    ],
}

ZH_TEMPLATES = {
    "order_status": [
        "我的{order}到哪了？",
        "{order}现在是什么状态？",
        "{date}买的{product}发货了吗？",
        "我的{product}什么时候能到？",
        "{order}物流{days}没更新了，还在路上吗？",
        "帮我查一下{order}的物流",
        "{order}今天能派送吗？",
        "我在{city}，{product}大概几天能到？",
        "{order}一直显示待发货，什么时候发？",
        "请问{order}有快递单号吗？",
        "{date}买的{product}到哪里了？",
        "想问下{order}预计什么时候送达",
        "我的包裹现在到哪一站了？{order}",
        "{date}下的单，怎么还没有物流信息？",
    ],
    "cancel_order": [
        "我要取消{order}",
        "{order}拍错了，帮我取消一下",
        "{date}买的{product}还能取消吗？",
        "还没发货的订单在{where}怎么取消？",
        "{product}不想要了，订单取消吧",
        "麻烦在发货前把{order}取消掉",
        "同一个订单下了两次，取消{order}",
        "{order}还没出库吧？我想取消",
        "别的地方{product}更便宜，我要取消订单",
        "{order}不要了，别发货了",
        "{where}找不到取消按钮，{order}怎么取消？",
        "我{date}下的{product}订单，帮我撤销",
        "{product}尺码拍错了，整个订单取消吧",
        "{order}请直接取消，不用发了",
    ],
    "refund_request": [
        "{order}我要退款",
        "{product}{date}已经寄回去了，钱什么时候退？",
        "{product}用不了，能退款吗？",
        "包裹{date}已经退回给你们了，退款到哪了？",
        "退款多久能到{pay}？",
        "{order}已经取消了，{amount}还没退给我",
        "{product}和描述不符，我要退钱",
        "请把{amount}退到我的{pay}，{order}",
        "{order}的退款申请过了{days}还没到账",
        "{product}少了配件，可以部分退款吗？",
        "已经收货的订单怎么申请退款？",
        "显示退款成功了，但是{pay}里没看到钱",
        "{order}申请退货退款",
        "{product}一直没收到，{order}给我退款吧",
    ],
    "change_shipping_address": [
        "{order}的收货地址要改一下",
        "我搬到{city}了，订单地址能改吗？",
        "{order}地址填错了，怎么修改？",
        "{product}能改寄到公司吗？不寄家里了",
        "请把{order}寄到我在{city}的新地址",
        "已经发货了还能改收货地址吗？",
        "{order}的邮编写错了，麻烦帮忙改一下",
        "{date}家里没人，包裹能改送到{city}我爸妈家吗？",
        "刚下的单在{where}怎么修改地址？",
        "{order}地址少写了门牌号，帮我更新一下",
        "包裹能转到{city}的自提点吗？",
        "{product}寄的是我的旧地址，请帮我改掉",
        "下周我去{city}出差，{order}能寄到那边吗？",
        "下单时选错了收货地址，能换一个吗？",
    ],
    "payment_issue": [
        "{pay}付款一直失败",
        "{order}被扣了两次钱",
        "支付失败了但是{amount}已经扣了",
        "为什么不能用{pay}付款？",
        "在{where}用{pay}支付的时候提示系统错误",
        "{pay}已经扣款了，{order}还显示待付款",
        "账户里有一笔{amount}的扣款，我不认识",
        "输完银行卡信息页面一直转圈，付不了款",
        "优惠券用了，结果还是按原价{amount}扣的钱",
        "{pay}付款成功了但没收到订单确认",
        "今天{pay}是不是有问题？一直付不了",
        "{product}页面价格更低，为什么扣了我{amount}？",
        "银行说交易被你们拒绝了，帮我查查",
        "{order}支付从{date}到现在一直卡在处理中",
    ],
    "account_login": [
        "我在{where}登录不上账号了",
        "提示账号因多次尝试被锁定了",
        "{where}登录时验证码一直收不到",
        "APP老是自动退出登录",
        "登录的时候提示{err}",
        "密码肯定没错，但一直说账号或密码错误",
        "用微信登录一直跳回登录页",
        "我的账号{date}被封了，为什么登不上？",
        "注册过的账号现在提示用户不存在",
        "两步验证出问题了，卡在登录页面",
        "账号被锁了怎么解锁？",
        "电脑上能登录，手机APP就是登不进去",
        "{where}一登录就提示会话已过期",
        "登不进账号，没法查看{order}",
    ],
    "password_reset": [
        "我忘记密码了",
        "{where}怎么重置密码？",
        "邮件里的重置密码链接过期了",
        "一直没收到重置密码的邮件",
        "我想改密码，{where}在哪里设置？",
        "点重置链接提示无效",
        "忘记密码了，验证码也收不到",
        "能重新发一个重置密码的链接吗？",
        "新密码一直提示不符合要求",
        "感觉密码泄露了，我要马上改密码",
        "密码忘了登不上，帮我重置一下",
        "为什么又要我重置密码？",
        "{where}点“忘记密码”没反应",
        "原来的密码想不起来了，怎么设置新密码？",
    ],
    "product_availability": [
        "{product}有货吗？",
        "{product}什么时候补货？",
        "{product}有{variant}的吗？",
        "{product}显示售罄了，还会再进货吗？",
        "{product}可以预订吗？",
        "{city}能买到{variant}的{product}吗？",
        "{product}{variant}还有库存吗？",
        "{holiday}之前{product}能补货吗？",
        "{city}的门店有{product}现货吗？",
        "{product}到货了能通知我吗？",
        "{product}{variant}为什么显示无货？",
        "{product}还卖吗？是不是停产了？",
        "{product}只剩2件了，我要{qty}件还能下单吗？",
        "{product}{variant}{when}会有货吗？",
    ],
    "delivery_complaint": [
        "包裹到了但是{product}的箱子都压扁了",
        "快递员把{order}的包裹直接扔在门外淋雨了",
        "物流显示{date}已签收，可我根本没收到包裹",
        "已经第三次送晚了，太失望了",
        "{carrier}快递员态度特别差，包裹直接扔地上",
        "{order}比承诺的晚了{days}才到，太离谱了",
        "收到的是别人的包裹，不是我的{product}",
        "{carrier}的快递员没打电话就说无人签收，把包裹退回去了",
        "{product}到的时候封口是破的，还有划痕",
        "为什么发{city}的快递总是这么慢？太差了",
        "{order}的包裹被送到别的地址去了",
        "{order}的箱子里少了一半东西",
        "快递员没送上门就点了签收，我要投诉",
        "对这次配送非常不满，{product}收到的时候全湿了",
        "{carrier}说{date}送货，结果一整天都没人来",
    ],
    "talk_to_human": [
        "转人工",
        "我要找人工客服",
        "能让真人来回复吗？",
        "机器人根本解决不了问题，给我转人工",
        "有客服电话吗？我想直接打电话",
        "人工客服",
        "帮我转接一下客服专员",
        "{order}的事我要找你们主管",
        "别自动回复了，我要人工服务",
        "能不能安排人给我回个电话？关于{product}的",
        "人工！人工！",
        "有没有真人在？我需要人工帮助",
        "不想跟机器人聊，找个真人",
        "怎么联系你们的客服团队？",
        "跟机器人绕了半天了，直接帮我转人工吧",
    ],
}

# --------------------------------------------------------------------------- dressing

EN_PREFIXES = ["hi, ", "hello, ", "hey, ", "hi there, ", "good morning, ", "excuse me, ", "hello team, ",
               "hey support, ", "quick question, "]
EN_SUFFIXES = ["Thanks!", "Thank you.", "Thanks in advance.", "Please help.", "thx", "thanks", "Cheers.",
               "please", "Appreciate it."]
ZH_PREFIXES = ["您好，", "你好，", "在吗？", "客服你好，", "亲，", "麻烦问一下，", "你好 ", "hello，"]
ZH_SUFFIXES = ["谢谢", "谢谢！", "麻烦了", "辛苦了", "谢谢啦", "急！", "麻烦看一下", "多谢"]
CALM_EMOJI = ["🙏", "😊", "🙂", "😅", "🤔"]
UPSET_EMOJI = ["😡", "😤", "😞", "🙄", "😩"]

# Misspellings people really type; applied to a few English utterances.
EN_TYPOS = {
    "receive": "recieve", "received": "recieved", "address": "adress", "password": "pasword",
    "cancel": "cancle", "refund": "refnud", "please": "pls", "order": "oder", "package": "pakage",
    "delivery": "delivary", "account": "acount", "available": "availble", "shipping": "shiping",
    "payment": "paymnet", "where": "wher", "the": "teh", "because": "becuase", "charged": "chraged",
    "tracking": "traking", "tomorrow": "tommorow", "something": "somthing", "person": "peron",
}

_I_WORDS = re.compile(r"\bi(?=\b|')")


def fake_order(rng: random.Random, lang: str) -> str:
    """Obviously fake order references: #A1234 in English, 订单号 58231 in Chinese."""
    if lang == "en":
        code = rng.choice("ABCDEFGHJKMN") + str(rng.randint(1000, 9999))
        return rng.choices([f"#{code}", code], weights=[4, 1])[0]
    number = str(rng.randint(10000, 99999))
    return rng.choices([f"订单号 {number}", f"订单{number}", f"订单号{number}", f"单号{number}"],
                       weights=[4, 2, 2, 1])[0]


def fake_amount(rng: random.Random, lang: str) -> str:
    if lang == "en":
        return f"${rng.randint(9, 260)}.{rng.choice(['00', '99', '50', '49'])}"
    value = rng.randint(19, 1999)
    return rng.choice([f"{value}元", f"¥{value}", f"{value}块"])


def fill(template: str, rng: random.Random, lang: str) -> str:
    slots = EN_SLOTS if lang == "en" else ZH_SLOTS

    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        if name == "order":
            return fake_order(rng, lang)
        if name == "amount":
            return fake_amount(rng, lang)
        return rng.choice(slots[name])

    return re.sub(r"\{(\w+)\}", one, template)


def add_typo(text: str, rng: random.Random) -> str:
    words = text.split(" ")
    known = [i for i, w in enumerate(words) if w.strip(",.?!'").lower() in EN_TYPOS]
    if known:
        i = rng.choice(known)
        bare = words[i].strip(",.?!'")
        words[i] = words[i].replace(bare, EN_TYPOS[bare.lower()], 1)
        return " ".join(words)
    long = [i for i, w in enumerate(words) if w.isalpha() and len(w) >= 5]
    if not long:
        return text
    i = rng.choice(long)
    w = words[i]
    j = rng.randint(1, len(w) - 3)
    words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2:]  # swap two neighbouring letters
    return " ".join(words)


def dress_en(core: str, intent: str, rng: random.Random) -> str:
    text = core
    r = rng.random()
    if r < 0.4:
        suffix = rng.choice(EN_SUFFIXES)
        if suffix == "please" and intent == "delivery_complaint":
            suffix = "Please help."  # a bare "please" reads oddly after a complaint
        if suffix == "please":
            text = text[:-1] + ", please?" if text.endswith("?") else text + " please"
        else:
            if not text.endswith(("?", ".", "!")):
                text += "," if suffix[0].islower() else "."
            text += " " + suffix
    if rng.random() < 0.45:
        text = rng.choice(EN_PREFIXES) + text
    if rng.random() < 0.07:
        text = add_typo(text, rng)
    if rng.random() < 0.08:
        text += " " + rng.choice(UPSET_EMOJI if intent in UPSET else CALM_EMOJI)
    if rng.random() < 0.15:  # typed in a hurry: lower case, no punctuation
        text = re.sub(r"[,.?!]", "", text.lower())
    else:
        text = _I_WORDS.sub("I", text)
        text = re.sub(r"([.?!] )([a-z])", lambda m: m.group(1) + m.group(2).upper(), text)
        text = text[0].upper() + text[1:]
    return " ".join(text.split())


def dress_zh(core: str, intent: str, rng: random.Random) -> str:
    text = core
    if rng.random() < 0.4:
        suffix = rng.choice(ZH_SUFFIXES)
        if not text.endswith(("？", "。", "！")):
            text += "，"
        text += suffix
    if rng.random() < 0.45:
        text = rng.choice(ZH_PREFIXES) + text
    if rng.random() < 0.08:
        text += rng.choice(UPSET_EMOJI if intent in UPSET else CALM_EMOJI)
    if rng.random() < 0.15:  # no punctuation, spaces instead
        text = re.sub(r"[，。？！]", " ", text)
    return " ".join(text.split())


def normalize(text: str) -> str:
    """Form used for de-duplication: NFKC, case-folded, punctuation/symbols/emoji removed, spaces collapsed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(" " if unicodedata.category(ch)[0] in "PS" else ch for ch in text)
    return " ".join(text.split())


def language(text: str) -> str:
    return "zh" if CJK.search(text) else "en"


def generate(seed: int = SEED) -> list[dict[str, str]]:
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[dict[str, str]] = []
    for intent, total in TARGETS.items():
        for lang, templates in (("en", EN_TEMPLATES[intent]), ("zh", ZH_TEMPLATES[intent])):
            want = total // 2 if lang == "en" else total - total // 2
            assert len(templates) >= 12, f"{intent}/{lang}: only {len(templates)} templates"
            order = list(templates)
            rng.shuffle(order)
            used: Counter[str] = Counter()
            made = attempts = 0
            while made < want:  # top up until the target is met, skipping duplicates
                attempts += 1
                if attempts > 200 * want:
                    raise RuntimeError(f"{intent}/{lang}: stuck at {made}/{want} unique utterances")
                template = order[attempts % len(order)]
                core = fill(template, rng, lang)
                text = dress_en(core, intent, rng) if lang == "en" else dress_zh(core, intent, rng)
                key = normalize(text)
                if not key or key in seen or len(text) > MAX_CHARS or language(text) != lang:
                    continue
                seen.add(key)
                used[template] += 1
                rows.append({"text": text, "label": intent})
                made += 1
            unused = [t for t in templates if not used[t]]
            assert not unused, f"{intent}/{lang}: templates never used: {unused}"
    rng.shuffle(rows)
    check(rows)
    return rows


def check(rows: list[dict[str, str]]) -> None:
    keys = [normalize(r["text"]) for r in rows]
    dupes = [k for k, n in Counter(keys).items() if n > 1]
    assert not dupes, f"normalised duplicates: {dupes[:5]}"
    per_label = Counter(r["label"] for r in rows)
    assert set(per_label) == set(TARGETS), sorted(per_label)
    for label, n in per_label.items():
        assert MIN_PER_INTENT <= n <= MAX_PER_INTENT, f"{label}: {n} examples"
        langs = Counter(language(r["text"]) for r in rows if r["label"] == label)
        assert abs(langs["en"] - langs["zh"]) <= n * 0.1, f"{label}: unbalanced languages {dict(langs)}"
    assert len(rows) >= MIN_TOTAL, f"only {len(rows)} rows"
    for r in rows:
        assert list(r) == ["text", "label"], r
        assert r["text"].strip() and len(r["text"]) <= MAX_CHARS, r
        assert "@" not in r["text"], r  # no e-mail addresses
        assert not re.search(r"\d{7,}", r["text"]), r  # nothing that looks like a phone number


def main() -> int:
    rows = generate()
    with OUTPUT.open("w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    per_label = Counter(r["label"] for r in rows)
    print(f"wrote {len(rows)} utterances to {OUTPUT}", file=sys.stderr)
    for label in TARGETS:
        langs = Counter(language(r["text"]) for r in rows if r["label"] == label)
        print(f"  {label:<24} {per_label[label]:>4}  en {langs['en']:>3}  zh {langs['zh']:>3}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
